"""Bench section ``study``: the batch experiment end to end, with the key/value store vs without.

Without a store every (method, B) unit optimises the values of its records again; with one
(a fresh store per timed run, so the figure is the reuse inside one experiment, not a warm
cache) each record's keys and values are computed once and every batch size and both methods
read them. Both runs must give the same rows (metrics, not times) before their speed means
anything. Quick: a tiny random Llama with SmolLM2's tokenizer; full: SmolLM2 itself on
CounterFact records (few value steps, so the figure is a lower bound of the saving at the
preset's 25).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pmedit.bench.harness import Row, compare

ORDER = 45
HELP = "batch experiment end to end: key/value store vs recomputing values per batch size and method"
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "counterfact" / "counterfact_original_500.json"


def _setup(quick: bool):
    from pmedit.models import load_model

    model, tok = load_model()
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg).eval()
    return model, tok


def _records(n: int, root: Path) -> Path:
    if not DATA.is_file():
        raise RuntimeError(f"bench study needs CounterFact at {DATA}")
    path = root / "cf.json"
    path.write_text(json.dumps(json.loads(DATA.read_text())[:n]))
    return path


def run(quick: bool = False) -> list[Row]:
    from pmedit.experiments import ExperimentConfig, run_experiment

    model, tok = _setup(quick)
    n, sizes = (8, [2, 4, 8]) if quick else (16, [4, 8, 16])
    layer = 1 if quick else 4
    d = model.config.intermediate_size
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)
    c0 = {layer: A @ A.T / (4 * d)}  # the statistics are not what this section measures
    root = Path(tempfile.mkdtemp(prefix="pmedit-bench-study-"))
    data = _records(n, root)
    runs = {"count": 0}

    def experiment(store: bool):
        runs["count"] += 1
        tag = f"{'store' if store else 'none'}-{runs['count']}"
        cfg = ExperimentConfig.from_dict(dict(
            experiment="batch", data=str(data), layers=[layer], methods=["memit", "emmet"], total_edits=n,
            batch_sizes=sizes, preset="smollm2", baseline=False, eval={"batch_size": 16},
            hparams={"steps": 3 if quick else 5, "n_templates": 1, "template_length": 5, "value_batch_size": 8},
            value_store=str(root / tag / "values") if store else None))
        return run_experiment(cfg, model=model, tokenizer=tok, out_dir=root / tag, progress=False,
                              second_moments=c0, plot=False)

    a, b = experiment(False), experiment(True)
    strip = [[{k: v for k, v in r.items() if "seconds" not in k} for r in x["rows"]] for x in (a, b)]
    if strip[0] != strip[1]:
        raise RuntimeError("batch experiment rows differ with and without the value store")
    units = 2 * len(sizes)
    case = f"batch experiment, {n} records, B={sizes}, memit+emmet ({'tiny Llama' if quick else 'SmolLM2'})"
    return compare("study", case, {"recompute per unit": lambda: experiment(False),
                                   "value store": lambda: experiment(True)},
                   reference="recompute per unit", work=units, unit="units", repeats=1 if quick else 3, warmup=0,
                   extra={"reuse_factor": b["value_store"]["reuse_factor"]})
