"""Unedited numbers for every evaluation probe on the default model (docs/evaluation.md).

python scripts/probe_numbers.py [--limit N] [--json out.json]: each probe on a fixed subsample
(the first N records of each file), with its wall time. Needs ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200, help="records per downstream task")
    ap.add_argument("--edit-limit", type=int, default=200, help="CounterFact / zsRE records")
    ap.add_argument("--tasks", default=None, help="comma-separated downstream tasks (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated probes to skip")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from pmedit.evaluation import TASKS, load_dataset, load_task, score_task
    from pmedit.evaluation.counterfact import evaluate_counterfact
    from pmedit.evaluation.exact_match import evaluate_exact_match
    from pmedit.evaluation.registry import run_metric_sets, shared_data_dir
    from pmedit.evaluation.zsre import evaluate_zsre
    from pmedit.fileio import atomic_write_json, machine_info
    from pmedit.models import load_model

    model, tok = load_model()
    model.eval()
    out = {"machine": machine_info(), "threads": torch.get_num_threads(), "probes": {}}
    skip = set(filter(None, args.skip.split(",")))

    def timed(name, n, fn):
        if name in skip:
            return
        t0 = time.perf_counter()
        summary = fn()
        dt = time.perf_counter() - t0
        out["probes"][name] = {"n": n, "seconds": round(dt, 1), "summary": summary}
        print(f"{name:24s} n={n:5d} {dt:7.1f}s  {json.dumps(summary)}", flush=True)
        if args.json:
            atomic_write_json(args.json, out)

    n = args.edit_limit
    cf = load_dataset("counterfact", limit=n)
    zs = load_dataset("zsre", limit=n)
    timed("counterfact", n, lambda: evaluate_counterfact(model, tok, cf, progress=False).summary)
    timed("zsre", n, lambda: evaluate_zsre(model, tok, zs).summary)
    timed("exact_match/counterfact", n, lambda: evaluate_exact_match(model, tok, cf).summary)
    timed("exact_match/zsre", n, lambda: evaluate_exact_match(model, tok, zs).summary)
    timed("perplexity", 20000, lambda: run_metric_sets(model, tok, [], ["perplexity"], dataset="counterfact"))
    for task in (args.tasks.split(",") if args.tasks else list(TASKS)):
        ex = load_task(task, shared_data_dir(), limit=args.limit)
        timed(f"downstream/{task}", len(ex), lambda: score_task(model, tok, task, ex).summary)


if __name__ == "__main__":
    main()
