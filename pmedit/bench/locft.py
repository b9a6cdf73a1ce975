"""Bench section ``locft``: LocFT-BF against EMMET on the same SmolLM2 CounterFact edits.

Both methods edit the same records (``counterfact_original_500.json``, seeded sample) in one
batch through ``Editor.edit``, each run to its own convergence rule, and are then scored the
same way (pmedit.evaluation.evaluate_counterfact: ES/PS/NS, teacher-forced target accuracy).

- ``time_to_target_s``: seconds of the ``edit`` call, which ends when the method's own
  criterion says the targets are reached: for LocFT-BF the first epoch whose mean training
  loss (target tokens + EOS) is below ``ft_loss_stop`` (or its last epoch); for EMMET value
  optimisation stopping per edit at NLL < ``loss_stop`` (or its last step), then the solve.
  One-time work is excluded and reported apart (``prepare_s``: context templates, and for
  EMMET C0 from the statistics cache and its factor).
- edits/s = edits / time_to_target_s. One measurement per method (each is minutes on CPU);
  the two run back to back in one process.

``python -m pmedit.bench.locft --layer-sweep`` runs the short layer sweep that chose the
SmolLM2 preset's layer (see pmedit/methods/locft.py and benchmarks/RESULTS.md).

Not here: the method (pmedit.methods.locft).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pmedit.bench.harness import Row

ORDER = 45
HELP = "LocFT-BF vs EMMET on the same SmolLM2 CounterFact edits: edits/s, time to target, ES/PS/NS"
SECTION = "locft"

COUNTERFACT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "counterfact" / "counterfact_original_500.json"


def load_records(n: int, path: Path = COUNTERFACT, seed: int = 0) -> list:
    from pmedit.data import load_counterfact, select

    if not path.is_file():
        raise FileNotFoundError(f"locft bench: CounterFact file {str(path)!r} not found (../shared/data)")
    return select(load_counterfact(path), n, seed=seed)


def _score(model, tok, records) -> dict:
    from pmedit.evaluation import evaluate_counterfact

    s = evaluate_counterfact(model, tok, records, progress=False).summary
    return {k: s.get(k) for k in ("es", "ps", "ns", "score", "es_acc")}


def _one(model, tok, records, hp, *, cache_dir=None) -> dict:
    from pmedit.editor import Editor

    ed = Editor(model, tok, hparams=hp, cache_dir=cache_dir, progress=False)
    t0 = time.perf_counter()
    ed.prepare()
    prep = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        rep = ed.edit([r.as_memit_dict() for r in records])
        sec = time.perf_counter() - t0
        out = {"time_to_target_s": sec, "prepare_s": prep, **_score(model, tok, records)}
        b = rep.batches[0]
        out["relative_update_norm"] = max(b.relative_update_norms.values())
        out["final_loss_mean"] = sum(b.value_losses) / len(b.value_losses)
        if "locft_epochs" in b.extra:
            out["epochs"] = b.extra["locft_epochs"]
            out["epoch_losses"] = [round(x, 4) for x in b.extra["locft_epoch_losses"]]
        else:
            out["value_steps_mean"] = sum(b.value_steps) / len(b.value_steps)
    finally:
        ed.restore()
    return out


def run(quick: bool = False) -> list[Row]:
    from pmedit.hparams import EditHparams
    from pmedit.models import load_model

    model, tok = load_model()
    model.eval()
    n = 8 if quick else 64
    records = load_records(n)
    # EMMET: the smollm2 preset with 2 context templates (5 take ~4x longer on 2 CPU cores) and
    # C0 from 20k tokens (cached after the first run); LocFT-BF: its smollm2 preset.
    emmet = EditHparams.preset("smollm2", method="emmet", n_templates=2, mom2_tokens=20_000)
    locft = EditHparams.preset("smollm2", method="locft-bf")
    rows = []
    for name, hp in (("EMMET", emmet), ("LocFT-BF", locft)):
        res = _one(model, tok, records, hp)
        case = f"SmolLM2 L{hp.layers[0]} fp32 cpu, {n} CounterFact edits in one batch"
        sec = res["time_to_target_s"]
        rows.append(Row(SECTION, case, name, sec, sec, sec, work=n, unit="edits",
                        extra={**res, "threads": torch.get_num_threads(), "hparams": _own_fields(hp)}))
    ref = rows[0].median_s
    for r in rows:
        r.ratio, r.reference = ref / r.median_s, "EMMET"
    for r in rows:
        info = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items()
                         if k != "hparams")
        print(f"  {r.provider:9s} {r.case}: {info}", flush=True)
    return rows


def _own_fields(hp) -> dict:
    if hp.method == "locft-bf":
        keys = ("layers", "ft_lr", "epochs", "minibatch_size", "ft_loss_stop", "ft_weight_decay", "append_eos", "seed")
    else:
        keys = ("layers", "lam", "lam_e", "steps", "lr", "n_templates", "loss_stop", "mom2_tokens")
    return {k: getattr(hp, k) for k in keys}


def layer_sweep(layers: list[int], n: int, lr: float, epochs: int, out: Path | None) -> list[dict]:
    """LocFT-BF on ``n`` CounterFact records in one batch at each layer; ES/PS/NS after each."""
    from pmedit.hparams import EditHparams
    from pmedit.models import load_model

    model, tok = load_model()
    model.eval()
    records = load_records(n)
    rows = []
    base = _score(model, tok, records)
    print(f"unedited: {base}", flush=True)
    for layer in layers:
        hp = EditHparams(method="locft-bf", layers=[layer], ft_lr=lr, epochs=epochs)
        res = _one(model, tok, records, hp)
        row = {"layer": layer, "ft_lr": lr, "epochs_max": epochs, "n": n, **res}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if out is not None:
        from pmedit.fileio import atomic_write_json, machine_info

        atomic_write_json(out, {"machine": machine_info(), "unedited": base, "rows": rows}, indent=2)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m pmedit.bench.locft")
    ap.add_argument("--layer-sweep", action="store_true", help="the SmolLM2 layer sweep instead of the section")
    ap.add_argument("--layers", default="2,4,8,12,16,20,24,27")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.layer_sweep:
        layer_sweep([int(x) for x in a.layers.split(",")], a.n, a.lr, a.epochs, a.json)
    else:
        from pmedit.bench.__main__ import main

        sys.exit(main(["locft", *(["--quick"] if a.quick else [])]))
