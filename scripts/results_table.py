"""A Markdown table of an experiment's result rows, each CounterFact figure with its bootstrap
interval over records: ``python scripts/results_table.py RUN_DIR [--columns k1,k2,...]``.

Reads RUN_DIR/results.json (written by ``pmedit experiment`` at the end), or for a run still in
progress the finished units in RUN_DIR/state.json; the columns default to what the
rows hold of ES/PS/NS/S, perplexity, the downstream probes' primary figures and the editing time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CI = ("es", "ps", "ns", "score", "ge")
DEFAULT = ("es", "ps", "ns", "score", "ppl", "ge", "sst2_acc", "rte_acc", "mmlu_acc", "kck_mean", "edit_seconds_total")
TITLES = {"es": "ES", "ps": "PS", "ns": "NS", "score": "S", "ppl": "ppl", "sst2_acc": "SST-2", "rte_acc": "RTE",
          "mmlu_acc": "MMLU", "edit_seconds_total": "edit s (so far)", "edit_seconds": "edit s", "ge": "GE",
          "kck_mean": "mean kᵀP⁻¹k", "seconds_values": "values s", "seconds_solve": "solve s", "eval_seconds": "eval s"}


def cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    if key in CI and row.get(f"{key}_lo") is not None:
        return f"{v:.1f} [{row[f'{key}_lo']:.1f}, {row[f'{key}_hi']:.1f}]"
    return f"{v:.0f}" if "seconds" in key else f"{v:.2f}" if key in ("ppl", "kck_mean") else f"{v:.1f}"


def table(rows: list[dict], columns) -> str:
    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    lam = any(r.get("lam") is not None for r in rows)  # a λ sweep: its x axis is a column
    layers = len({r.get("layer") for r in rows if r.get("method") != "none"}) > 1  # a layer sweep: its x axis
    head = (["method"] + (["layer"] if layers else []) + (["λ"] if lam else []) + ["B", "edits"]
            + [TITLES.get(c, c) for c in cols])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([str(r.get("method"))] + ([str(r.get("layer"))] if layers else [])
                                     + ([f"{r['lam']:g}" if r.get("lam") is not None else "–"]
                                        if lam else [])
                                     + [str(r.get("batch_size")), str(r.get("n_edits"))]
                                     + [cell(r, c) for c in cols]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--columns", default=",".join(DEFAULT), help="comma-separated row keys")
    ap.add_argument("--plot", type=Path, help="also draw the rows (the run's own figure) into this PNG")
    args = ap.parse_args(argv)
    from pmedit.experiments import ExperimentConfig, plan

    path = args.run_dir / "results.json"
    try:
        if path.is_file():
            res = json.loads(path.read_text())
            rows = res["rows"]
            cfg = ExperimentConfig.from_dict(res["config"], source=str(path))
        else:  # a run in progress: the rows of the units finished so far
            from pmedit.experiments.results import collect_rows

            path = args.run_dir / "state.json"
            state = json.loads(path.read_text())
            cfg = ExperimentConfig.from_dict(state["config"], source=str(path))
            rows = collect_rows(cfg, plan(cfg), state["units"])
    except (OSError, ValueError, KeyError) as e:
        print(f"{path}: cannot read result rows ({e})", file=sys.stderr)
        return 2
    print(table(rows, args.columns.split(",")))
    if args.plot is not None:
        from pmedit.experiments.plots import plot_rows

        print(f"plot: {plot_rows(cfg, rows, args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
