"""Bench section ``edit``: batched value optimisation against one edit at a time, and end-to-end
EMMET batches.

Value optimisation is where an edit's time goes. Both providers run the same function
(``pmedit.values.optimize_values``) with the same settings on the same requests, in the same
interleaved rounds; "one at a time" calls it once per request (``batch_size=1``), as the
research code does, "batched" passes all requests with ``batch_size`` edits per
forward/backward. ``loss_stop=0`` so every edit takes exactly ``steps`` updates (the work is
fixed; the trajectories are identical either way, which each row checks: ``max_rel_diff`` is
the largest per-edit ‖δ_batched − δ_single‖/‖δ_single‖ of the last round).

- CPU: SmolLM2-135M (the default model), CounterFact edits (../shared/data, or a small
  built-in list), 64 edits (8 with ``--quick``), few steps so the section fits in minutes.
- CUDA (when available): a Llama-3-8B-shaped model with random bf16 weights, 256 edits.

End-to-end rows: seconds and peak memory of one ``Editor(..., method="emmet").edit(requests,
batch_size=B)`` call with B = all requests (64, and 4096 on a tiny random Llama on CPU or the
8B-shaped model on CUDA). On CPU each end-to-end case runs in a fresh subprocess so that its
peak RSS (``resource.getrusage``) is its own; ``rss_before_edit_mb`` is the RSS with the model
loaded, just before the edit.
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from pmedit.bench.harness import Row, compare
from pmedit.fileio import read_json

ORDER = 40
HELP = "value optimisation batched vs one edit at a time; end-to-end EMMET batches (64, 4096 edits)"
SECTION = "edit"

COUNTERFACT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "counterfact" / "easyedit_counterfact-edit.json"

# Used when ../shared/data is absent (a fresh clone): simple counterfactuals, cycled as needed.
_BUILTIN = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    ("{} was born in", "Alan Turing", "Paris", "London"),
    ("The capital of {} is", "France", "Rome", "Paris"),
    ("{} plays the", "Miles Davis", "violin", "trumpet"),
    ("{} is a company from", "Toyota", "Sweden", "Japan"),
    ("The {} is located in the city of", "Eiffel Tower", "Berlin", "Paris"),
    ("{} is a professional", "Lionel Messi", "chess player", "footballer"),
    ("The official language of {} is", "Brazil", "German", "Portuguese"),
    ("{}, who works as a", "Marie Curie", "pilot", "physicist"),
    ("{} was written in", "Don Quixote", "Japanese", "Spanish"),
    ("{} is headquartered in", "Microsoft", "Lagos", "Redmond"),
    ("The main ingredient of {} is", "guacamole", "cheese", "avocado"),
]


def load_requests(n: int) -> tuple[list, str]:
    """``n`` requests from CounterFact (first records), or the built-in list cycled."""
    from pmedit.requests import EditRequest, normalize_requests

    path = Path(os.environ.get("PMEDIT_COUNTERFACT", COUNTERFACT))
    if path.is_file():
        data = read_json(path)
        if len(data) >= n:
            return normalize_requests(data[:n]), f"CounterFact ({path.name})"
    reqs = []
    for i in range(n):
        p, s, new, true = _BUILTIN[i % len(_BUILTIN)]
        reqs.append(EditRequest(p, s, new, true, case_id=f"builtin-{i}"))
    return reqs, "built-in list"


def _agreement(batched: torch.Tensor, single: torch.Tensor) -> dict:
    """How far batched δ is from one-at-a-time δ, per edit, worst edit reported.

    ``max_rel_diff``: ‖Δδ‖/‖δ‖; ``max_elem_diff_rel``: max|Δδ|/‖δ‖ (the test's measure). fp32
    rounding differs between batch shapes, and Adam divides each component by its own gradient
    scale, so components with near-zero gradients carry that rounding into δ visibly.
    """
    n = single.norm(dim=1).clamp_min(1e-12)
    d = batched - single
    return {"max_rel_diff": float((d.norm(dim=1) / n).max()),
            "max_elem_diff_rel": float((d.abs().amax(dim=1) / n).max())}


def _values_rows(case: str, model, tok, layer: int, reqs: list, templates: list[str], *, steps: int,
                 batch_size: int, repeats: int, device, extra: dict) -> list[Row]:
    from pmedit.models import ModelSpec
    from pmedit.values import optimize_values

    spec = ModelSpec.from_model(model)
    kw = dict(steps=steps, loss_stop=0.0)
    last = {}

    def batched():
        last["batched"] = optimize_values(model, tok, spec, layer, reqs, templates, batch_size=batch_size, **kw).delta

    def single():
        last["single"] = torch.cat([optimize_values(model, tok, spec, layer, [r], templates, batch_size=1, **kw).delta
                                    for r in reqs])

    rows = compare(SECTION, case, {"one at a time": single, "batched": batched}, reference="one at a time",
                   work=len(reqs), unit="edits", repeats=repeats, warmup=0, device=device,
                   extra=dict(extra, steps=steps, batch_size=batch_size, n_templates=len(templates)))
    agree = _agreement(last["batched"].float().cpu(), last["single"].float().cpu())
    for r in rows:
        r.extra.update(agree)
    return rows


# ------------------------------------------------------------------------------ CPU


def _cpu_values(quick: bool) -> list[Row]:
    from pmedit.keys import context_templates
    from pmedit.models import load_model

    model, tok = load_model()
    n_edits, steps, n_templates = (8, 1, 2) if quick else (64, 2, 2)
    reqs, source = load_requests(n_edits)
    templates = context_templates(model, tok, n=n_templates, length=10, seed=0)
    layer = 4
    case = f"SmolLM2 L{layer} fp32 cpu, {n_edits} edits, {steps} steps, {n_templates} templates"
    rows = _values_rows(case, model, tok, layer, reqs, templates, steps=steps, batch_size=64,
                        repeats=2 if quick else 2, device="cpu",
                        extra={"requests": source, "threads": torch.get_num_threads()})
    del model
    return rows


def _engine_rows(quick: bool) -> list[Row]:
    """Today's value optimisation (the frozen copy, pmedit/bench/values_reference.py) against the
    cached engine in fp32 and bf16, same requests, same settings, interleaved: at the smollm2
    preset's prompts (5 templates of 10 tokens) and at the experiment configs' (1 template of 5
    tokens, 5 steps). ``loss_stop=0`` fixes the work (every edit takes every step); the cached
    engine's once-per-row passes are included, so with the preset's 25 steps the ratio is higher
    than at the few steps measured here. ``max_rel_diff``: worst per-edit ‖δ − δ_today‖/‖δ_today‖."""
    from pmedit.bench.values_reference import optimize_values as today
    from pmedit.keys import context_templates
    from pmedit.models import ModelSpec, load_model
    from pmedit.values import optimize_values

    model, tok = load_model()
    spec = ModelSpec.from_model(model)
    n_edits = 4 if quick else 8
    reqs, source = load_requests(n_edits)
    layer = 4
    rows = []
    for label, n_templates, length, steps in [("smollm2 preset prompts", 5, 10, 1 if quick else 4),
                                               ("experiment configs", 1, 5, 2 if quick else 5)]:
        templates = context_templates(model, tok, n=n_templates, length=length, seed=0)
        kw = dict(steps=steps, loss_stop=0.0, batch_size=16)
        last = {}

        def run(name, fn, **extra):
            def call():
                last[name] = fn(model, tok, spec, layer, reqs, templates, **kw, **extra).delta
            return call

        fns = {"today (frozen copy)": run("today", today),
               "cached fp32": run("cached fp32", optimize_values, engine="cached"),
               "cached bf16": run("cached bf16", optimize_values, engine="cached", dtype="bfloat16")}
        case = (f"values SmolLM2 L{layer} cpu, {label}: {n_edits} edits, {steps} steps, "
                f"{n_templates} templates of {length} tokens")
        got = compare(SECTION, case, fns, reference="today (frozen copy)", work=n_edits, unit="edits",
                      repeats=2, warmup=0, device="cpu",
                      extra={"requests": source, "threads": torch.get_num_threads()})
        for r in got:
            key = {"today (frozen copy)": "today"}.get(r.provider, r.provider)
            r.extra.update(_agreement(last[key].float(), last["today"].float()))
        rows += got
    del model
    return rows


def _e2e_child(args: dict) -> dict:
    """One end-to-end EMMET edit in this (fresh) process; returns seconds and memory."""
    from pmedit.editor import Editor
    from pmedit.models import load_model
    from pmedit.stats import load_or_collect

    torch.manual_seed(0)
    if args["model"] == "smollm2":
        model, tok = load_model()
    else:  # a tiny random Llama that reads SmolLM2's token ids
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from pmedit.models import default_gguf_path

        gguf = default_gguf_path()  # the tokenizer only: loading SmolLM2 itself would set the peak RSS
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.pad_token = tok.pad_token or tok.eos_token
        tok.padding_side = "right"
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)
        model = LlamaForCausalLM(cfg).eval()
    layer = args["layer"]
    stats = load_or_collect(model, tok, [layer], max_tokens=args["stats_tokens"], progress=False,
                            cache_dir=args.get("cache_dir"))
    hp = {"layers": [layer], "method": "emmet", "steps": args["steps"], "n_templates": args["n_templates"],
          "lam_e": 0.1, "value_batch_size": args["value_batch_size"], "key_batch_size": 64}
    reqs, source = load_requests(args["n_edits"])
    ed = Editor(model, tok, hparams=hp, second_moments={layer: stats[layer].mean}, progress=False)
    rss_before = _rss_mb("VmRSS")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    report = ed.edit(reqs, batch_size=len(reqs))
    seconds = time.perf_counter() - t0
    rss_peak = _rss_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    b = report.batches[0]
    return {"seconds": seconds, "rss_before_edit_mb": rss_before, "rss_peak_mb": rss_peak, "requests": source,
            "seconds_values": b.seconds_values, "seconds_keys": b.seconds_keys}


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB; getrusage elsewhere.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` cannot serve here: Linux carries the parent's peak RSS
    over fork+exec into the child's ru_maxrss, so a child of a process holding SmolLM2 reports
    at least that much whatever it does.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next read is the edit's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_e2e(quick: bool) -> list[Row]:
    cases = [
        ("smollm2", 4, 8 if quick else 64, 1, 2, 16, "SmolLM2"),
        ("tiny", 2, 1024 if quick else 4096, 1, 2, 256, "tiny random Llama (h=128, 4 layers)"),
    ]
    rows = []
    for model, layer, n, steps, n_templates, vbs, label in cases:
        args = {"model": model, "layer": layer, "n_edits": n, "steps": steps, "n_templates": n_templates,
                "value_batch_size": vbs, "stats_tokens": 20_000}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pmedit.bench.edit", "--e2e-child", json.dumps(args)],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            print(f"edit bench: end-to-end {n} edits on {label} failed:\n  " + "\n  ".join(tail), flush=True)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        case = f"EMMET end-to-end {label} L{layer} fp32 cpu, {n} edits in one batch, {steps} value steps"
        rows.append(Row(SECTION, case, "Editor.edit", res["seconds"], res["seconds"], res["seconds"], work=n,
                        unit="edits", extra={**res, "process_seconds": time.perf_counter() - t0}))
    return rows


# ----------------------------------------------------------------------------- CUDA


def _llama3_8b_shaped(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=max(vocab, 128256), max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def _cuda_rows(quick: bool) -> list[Row]:
    from pmedit.editor import Editor
    from pmedit.keys import context_templates
    from pmedit.models import load_model

    _, tok = load_model()  # SmolLM2's tokenizer supplies ids; the weights are random anyway
    model = _llama3_8b_shaped(len(tok))
    n_edits, steps = (32, 2) if quick else (256, 5)
    reqs, source = load_requests(n_edits)
    templates = context_templates(model, tok, n=5, length=10, seed=0)
    layer = 1
    case = f"Llama-3-8B-shaped random L{layer} bf16 cuda, {n_edits} edits, {steps} steps, 5 templates"
    rows = _values_rows(case, model, tok, layer, reqs, templates, steps=steps, batch_size=64, repeats=1,
                        device="cuda", extra={"requests": source})
    d = model.config.intermediate_size
    for n in ([64] if quick else [64, 4096]):
        reqs, source = load_requests(n)
        torch.manual_seed(0)
        x = torch.randn(8192, d, device="cuda", dtype=torch.float64)  # C0 of random weights: no corpus needed
        c0 = x.T @ x / x.shape[0]
        hp = {"layers": [layer], "method": "emmet", "steps": steps, "lam_e": 0.1, "value_batch_size": 64,
              "key_batch_size": 64}
        ed = Editor(model, tok, hparams=hp, second_moments={layer: c0}, progress=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ed.edit(reqs, batch_size=n)
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20
        ed.restore()
        case = f"EMMET end-to-end Llama-3-8B-shaped L{layer} bf16 cuda, {n} edits in one batch, {steps} value steps"
        rows.append(Row(SECTION, case, "Editor.edit", sec, sec, sec, work=n, unit="edits",
                        extra={"cuda_peak_allocated_mb": peak, "requests": source}))
    return rows


def run(quick: bool = False) -> list[Row]:
    rows = _cpu_values(quick) + _engine_rows(quick)
    if importlib.util.find_spec("pmedit.editor") is None:
        print("edit bench: pmedit/editor.py is not there yet; end-to-end rows skipped", flush=True)
    else:
        rows += _cpu_e2e(quick)
    if torch.cuda.is_available():
        rows += _cuda_rows(quick)
    else:
        print("edit bench: no CUDA device; the GPU rows (Llama-3-8B-shaped, 256 edits) were not run", flush=True)
    for r in rows:
        info = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items())
        print(f"  {r.provider:14s} {r.case}: {info}", flush=True)
    return rows


# ------------------------------------------------------------------- edit quality

QUALITY_CONFIGS = {  # hparams changes over the smollm2 preset; "today" is the preset as it is
    "today": {},
    "cached": {"value_engine": "cached"},
    "cached+bf16": {"value_engine": "cached", "value_dtype": "bfloat16"},
    "cached+bf16+argmax": {"value_engine": "cached", "value_dtype": "bfloat16", "stop_on_argmax": True},
    "memit+cached+bf16": {"value_objective": "memit", "value_engine": "cached", "value_dtype": "bfloat16"},
}


def quality(n: int, configs: list[str], *, data: str | None = None, seed: int = 0) -> dict:
    """ES/PS/NS on the same ``n`` CounterFact records edited with EMMET at B = n under each of
    ``configs`` (smollm2 preset, C0 from the cached statistics), with the value seconds of each.
    Run by hand (``python -m pmedit.bench.edit --quality 64 today cached+bf16``): minutes per
    configuration on 2 cores, too slow for the timed section."""
    from pmedit.data import load_counterfact, select
    from pmedit.editor import Editor
    from pmedit.evaluation import evaluate_counterfact
    from pmedit.hparams import EditHparams
    from pmedit.models import load_model
    from pmedit.stats import load_or_collect

    unknown = [c for c in configs if c not in QUALITY_CONFIGS]
    if unknown:
        raise ValueError(f"--quality: unknown configuration(s) {unknown}; known: {', '.join(QUALITY_CONFIGS)}")
    path = Path(data) if data else COUNTERFACT.parent / "counterfact_original_500.json"
    records = select(load_counterfact(path), n, seed=seed)
    model, tok = load_model()
    base = EditHparams.preset("smollm2")
    layer = base.layers[0]
    stats = load_or_collect(model, tok, [layer], corpus=base.mom2_corpus, max_tokens=base.mom2_tokens, progress=False)
    out = {"n": n, "data": path.name, "seed": seed, "threads": torch.get_num_threads(), "configs": {}}
    for name in configs:
        hp = base.replace(**QUALITY_CONFIGS[name])
        ed = Editor(model, tok, hparams=hp, second_moments={layer: stats[layer].mean}, progress=False)
        ed.prepare()
        t0 = time.perf_counter()
        report = ed.edit(records, batch_size=n)
        seconds = time.perf_counter() - t0
        b = report.batches[0]
        res = evaluate_counterfact(model, tok, records, progress=False)
        ed.restore()
        out["configs"][name] = {"hparams": QUALITY_CONFIGS[name], "seconds_edit": seconds,
                                "seconds_values": b.seconds_values, "mean_value_steps": sum(b.value_steps) / n,
                                "summary": res.summary}
        print(json.dumps({name: out["configs"][name]}), flush=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--e2e-child":
        print(json.dumps(_e2e_child(json.loads(sys.argv[2]))))
    elif len(sys.argv) >= 3 and sys.argv[1] == "--quality":
        print(json.dumps(quality(int(sys.argv[2]), sys.argv[3:] or list(QUALITY_CONFIGS))))
    else:
        from pmedit.bench.__main__ import main

        sys.exit(main(["edit", *sys.argv[1:]]))
