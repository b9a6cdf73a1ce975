"""``pmedit experiment NAME --config FILE``: run or resume one experiment of the study.

NAME is one of layer-sweep, batch, sequential-batch, lambda-sweep and must match the config's
``experiment`` field (or fills it when the config leaves it out). Running the same command
again after an interruption resumes at the next unfinished unit; results (JSON, CSV, PNG) land
in the config's ``out_dir`` (default ``runs/NAME``). ``--report`` writes them for the units
finished so far, without running anything (a run that spans sessions, or one still running).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "run an experiment of the batch-size study"

log = logging.getLogger(__name__)

NAMES = ("layer-sweep", "batch", "sequential-batch", "lambda-sweep")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=NAMES, help="which experiment")
    p.add_argument("--config", type=Path, required=True, help="experiment config (.json or .yaml)")
    p.add_argument("--out-dir", type=Path, default=None, help="run directory (overrides the config's out_dir)")
    p.add_argument("--total-edits", type=int, default=None, help="override total_edits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--report", action="store_true",
                   help="write results (JSON, CSV, PNG) of the units finished so far; run nothing")


def run(args: argparse.Namespace) -> int:
    from pmedit.experiments import report_experiment, run_experiment

    cfg = _load(args)  # a bad config ends in pmedit.cli as one line naming the file, exit code 2
    if args.report:
        out = report_experiment(cfg, out_dir=args.out_dir, plot=not args.no_plot)
        print(f"{out['units']['done']} of {out['units']['total']} units done")
    else:
        out = run_experiment(cfg, out_dir=args.out_dir, progress=not args.no_progress, plot=not args.no_plot)
    cols = ["method", "layer", "batch_size", "lam", "n_edits", "es", "ps", "ns", "score", "ppl", "ge"]
    present = [c for c in cols if any(r.get(c) is not None for r in out["rows"])]
    print("  ".join(f"{c:>10s}" for c in present))
    for r in out["rows"]:
        print("  ".join(_fmt(r.get(c)) for c in present))
    print(f"results in {out['out_dir']}" + (f" (plot {out['plot']})" if "plot" in out else ""))
    return 0


def _load(args):
    from pmedit.experiments import ExperimentConfig
    from pmedit.experiments.config import read_config_mapping

    p = args.config
    data = read_config_mapping(p)
    name = data.setdefault("experiment", args.name)
    if name != args.name:
        raise ValueError(f"{p}: the config is for experiment {name!r}, not {args.name!r}")
    if args.total_edits is not None:
        data["total_edits"] = args.total_edits
    return ExperimentConfig.from_dict(data, source=str(p))


def _fmt(v) -> str:
    if v is None:
        return f"{'':>10s}"
    if isinstance(v, float):
        return f"{v:10.2f}"
    return f"{v!s:>10s}"
