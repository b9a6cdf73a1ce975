"""The study's cost per phase: counted tokens, FLOPs, the effective rate the SmolLM2 runs
reached on this machine, and the estimate for the GPU configs (Llama-3-8B) on one H100.

    PYTHONPATH=. python scripts/study_estimate.py                      # all study configs
    PYTHONPATH=. python scripts/study_estimate.py --utilisation 0.25   # another H100 utilisation

Counts use SmolLM2's tokenizer and context templates (pmedit.experiments.cost). Runs found in
each config's out_dir calibrate the method (µs per token and GFLOP/s measured here)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("study-lambda-smollm2", "lambda-llama3-8b-gpu"), ("study-batch-smollm2", "batch-llama3-8b-gpu"),
         ("study-sequential-smollm2", "sequential-llama3-8b-gpu"), ("study-layer-sweep-smollm2", "layer-sweep-llama3-8b-gpu"),
         ("study-objective-memit-smollm2", None)]


def _hours(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 360 else f"{s / 60:.1f} min"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utilisation", type=float, default=None, help="fraction of the H100 bf16 peak (default 0.35)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    from pmedit.experiments import ExperimentConfig
    from pmedit.experiments.cost import H100_SXM, LLAMA3_8B, Shape, calibrate, count_work, seconds_on
    from pmedit.keys import context_templates
    from pmedit.models import load_model

    acc = H100_SXM if a.utilisation is None else dataclasses.replace(H100_SXM, utilisation=a.utilisation)
    model, tok = load_model()
    smol = Shape.from_hf_config(model.config)
    tmpl_cache: dict = {}

    def templates(cfg):
        hp = cfg.edit_hparams(cfg.methods[0])
        key = (hp.n_templates, hp.template_length)
        if key not in tmpl_cache:
            tmpl_cache[key] = context_templates(model, tok, n=hp.n_templates, length=hp.template_length, seed=0)
        return tmpl_cache[key]

    out = []
    print("| experiment | value optimisations | value tokens/step | scored records | measured here: values | eval "
          "| µs/token (values, eval) | GFLOP/s (values, eval) | GPU config: value optimisations, scored records "
          "| Llama-3-8B on one H100: values | scoring+ppl+GE | solves | total |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for small, gpu in PAIRS:
        path = ROOT / "configs" / "experiments" / f"{small}.json"
        if not path.is_file():
            continue
        cfg = ExperimentConfig.from_file(path)
        w = count_work(cfg, tok, templates(cfg))
        res = ROOT / (cfg.out_dir or "") / "results.json"
        cal = None
        if cfg.out_dir and res.is_file():
            rows = [r for r in json.loads(res.read_text())["rows"] if r.get("method") != "none"]
            cal = calibrate(w, smol, rows)
        est, gw = None, None
        if gpu:
            gcfg = ExperimentConfig.from_file(ROOT / "configs" / "experiments" / f"{gpu}.json")
            gw = count_work(gcfg, tok, templates(gcfg))
            est = seconds_on(gw, LLAMA3_8B, acc)
        meas = ("—", "—", "—", "—") if cal is None else (
            _hours(cal["value_seconds"]), _hours(cal["eval_seconds"]),
            f"{cal['value_us_per_row_token_step']:.0f}, {cal['eval_us_per_token']:.0f}",
            f"{cal['value_gflops_s']:.0f}, {cal['eval_gflops_s']:.0f}")
        g = ("—",) * 5 if est is None else (f"{gw.value_optimisations}, {gw.scored_records}",_hours(est["values"] + est["keys"]), _hours(est["scoring"] + est["ppl"] + est["ge"]),
                                           _hours(est["solves"]), _hours(est["total"]))
        print(f"| {small} | {w.value_optimisations} | {w.value_row_tokens} | {w.scored_records} | "
              + " | ".join(meas) + " | " + " | ".join(g) + " |")
        out.append({"config": small, "work": w.to_dict(), "measured": cal, "gpu_config": gpu,
                    "gpu_work": gw and gw.to_dict(), "h100_seconds": est})
    print(f"\nH100: {acc.bf16_flops / 1e12:.0f} TFLOP/s bf16 at {acc.utilisation:.0%} utilisation, "
          f"{acc.fp64_flops / 1e12:.0f} TFLOP/s fp64; Llama-3-8B: {LLAMA3_8B.layers} layers, d = {LLAMA3_8B.intermediate}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
