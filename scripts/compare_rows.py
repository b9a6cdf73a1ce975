"""Result rows of different runs side by side, as grouped bars with their bootstrap intervals:
``python scripts/compare_rows.py OUT.png RUN_DIR[:key=value,...]@LABEL ...``.

Each argument picks the rows of RUN_DIR/results.json whose fields equal the given values (e.g.
``"docs/study/lambda-smollm2:method=memit,lam=100@MEMIT, pmedit objective"``); it must pick exactly
one row, so a comparison never silently averages or drops one. Written for runs that put the
same records under different settings (the value-objective comparison of docs/experiments.md),
where one plot says more than two tables.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pmedit.fileio import atomic_path, read_json

METRICS = (("es", "ES"), ("ps", "PS"), ("ns", "NS"), ("score", "S"))


def parse_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    rest, at, label = spec.rpartition("@")
    if not at or not rest or not label:
        raise ValueError(f"{spec!r}: expected RUN_DIR[:key=value,...]@LABEL")
    run, _, filt = rest.partition(":")
    where = {}
    for item in filter(None, filt.split(",")):
        if "=" not in item:
            raise ValueError(f"{spec!r}: filter item {item!r} is not key=value")
        k, v = item.split("=", 1)
        where[k] = v
    return label, Path(run), where


def _matches(row: dict, where: dict[str, str]) -> bool:
    for k, v in where.items():
        x = row.get(k)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            try:
                if float(v) != float(x):
                    return False
            except ValueError:
                return False
        elif str(x) != v:
            return False
    return True


def pick(run: Path, where: dict[str, str]) -> dict:
    path = run / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results (has the run finished?)")
    res = read_json(path, what="results")
    rows = res.get("rows") if isinstance(res, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: no 'rows' list (not a pmedit experiment's results)")
    hits = [r for r in rows if _matches(r, where)]
    if len(hits) != 1:
        raise ValueError(f"{path}: {len(hits)} rows match {where} (need exactly one)")
    return hits[0]


def plot(out: Path, picked: list[tuple[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axp) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / len(picked)
    for j, (label, row) in enumerate(picked):
        xs = [i + (j - (len(picked) - 1) / 2) * width for i in range(len(METRICS))]
        ys = [row[k] for k, _ in METRICS]
        lo = [row[k] - row.get(f"{k}_lo", row[k]) for k, _ in METRICS]
        hi = [row.get(f"{k}_hi", row[k]) - row[k] for k, _ in METRICS]
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=label)
        axp.bar([j], [row.get("ppl") or 0.0], 0.8, color=f"C{j}")
    ax.set_xticks(range(len(METRICS)), [t for _, t in METRICS])
    ax.set_ylabel("CounterFact (95 % bootstrap interval)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower left")
    axp.set_xticks(range(len(picked)), [str(i + 1) for i in range(len(picked))])
    axp.set_title("perplexity (bar n = legend entry n)", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("rows", nargs="+", help="RUN_DIR[:key=value,...]@LABEL, one row each")
    a = ap.parse_args(argv)
    try:
        picked = [(label, pick(run, where)) for label, run, where in map(parse_spec, a.rows)]
    except (ValueError, FileNotFoundError) as e:
        print(f"compare_rows: {e}", file=sys.stderr)
        return 2
    plot(a.out, picked)
    for label, row in picked:
        print(f"{label}: " + ", ".join(f"{t} {row[k]:.1f}" for k, t in METRICS) + f", ppl {row.get('ppl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
