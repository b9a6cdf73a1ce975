"""Figures of the study's shape from result rows (matplotlib, Agg, small PNGs).

One panel per headline metric of the run's metric sets (pmedit.evaluation.registry: ES, PS,
NS, S for CounterFact, zsRE's three accuracies, each probe's primary figure, ...; perplexity
when measured), one line per method; the unedited model, when scored, is a dashed line. The x
axis is what the experiment varies: layer, batch size (log scale) or λ. A sequential-batch run
scored at several edit counts also gets ``*-progress.png``: the metrics against the number of
edits so far, one line per method and batch size. Rows with bootstrap intervals (``es_lo`` …)
get a shaded band.
"""
from __future__ import annotations

from pathlib import Path

from pmedit.fileio import atomic_path

TITLES = {"es": "ES", "ps": "PS", "ns": "NS", "score": "S", "ppl": "perplexity", "ge": "GE", "gen_acc": "gen. acc"}
XAXIS = {"layer-sweep": ("layer", "edited layer"), "batch": ("batch_size", "batch size"),
         "sequential-batch": ("batch_size", "batch size (sequential)"), "lambda-sweep": ("lam", "λ (MEMIT) / λₑ (EMMET)")}


def metric_keys(cfg, rows: list[dict]) -> list[tuple[str, str]]:
    """(key, title) of the headline metrics the rows hold: the run's metric sets and probes."""
    from pmedit.evaluation.registry import headline_keys

    keys = headline_keys(list(cfg.edit_metric_sets) + list(cfg.eval.probes), cfg.eval.settings) + ["ppl", "ge"]
    return [(k, TITLES.get(k, k)) for k in dict.fromkeys(keys) if any(r.get(k) is not None for r in rows)]


def _figure(metrics, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(metrics), 6)
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    return plt, fig, list(axes.flat)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return path


def _line(ax, pts, label):
    """pts: (x, y, (lo, hi)) sorted by x; where lo/hi (a row's bootstrap interval) exist they
    are a band around the line."""
    line, = ax.plot([x for x, y, _ in pts], [y for x, y, _ in pts], marker="o", ms=3, label=label)
    band = [(x, lo, hi) for x, _, (lo, hi) in pts if lo is not None and hi is not None]
    if band:
        ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=line.get_color(),
                        alpha=0.15, lw=0)


def _points(rows, xkey, key):
    return sorted(((r[xkey], r[key], (r.get(f"{key}_lo"), r.get(f"{key}_hi"))) for r in rows if r.get(key) is not None),
                  key=lambda p: p[0])


def _style(ax, title, xlabel):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def plot_rows(cfg, rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    xkey, xlabel = XAXIS[cfg.experiment]
    base = next((r for r in rows if r.get("method") == "none"), None)
    data = [r for r in rows if r.get("method") != "none"]
    if cfg.experiment == "sequential-batch":  # the figure shows the end of each sequence
        data = [r for r in data if r.get("n_edits") == cfg.total_edits]
    metrics = metric_keys(cfg, data) or [("es", "ES")]
    plt, fig, axes = _figure(metrics, f"{cfg.experiment}: {cfg.total_edits} {cfg.dataset} edits, seed {cfg.seed}")
    for ax, (key, title) in zip(axes, metrics):
        for m in dict.fromkeys(r["method"] for r in data):
            pts = _points([r for r in data if r["method"] == m], xkey, key)
            if pts:
                _line(ax, pts, m.upper())
        if base is not None and base.get(key) is not None:
            ax.axhline(base[key], ls="--", c="grey", lw=1, label="unedited")
        if cfg.experiment in ("batch", "sequential-batch"):
            ax.set_xscale("log", base=2)
        if cfg.experiment == "lambda-sweep" and data and all(r[xkey] > 0 for r in data):
            ax.set_xscale("log")
        _style(ax, title, xlabel)
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_progress(cfg, rows: list[dict], path: str | Path) -> Path | None:
    """Sequential-batch metrics against the number of edits so far; None with one edit count."""
    data = [r for r in rows if r.get("method") != "none" and r.get("n_edits")]
    if cfg.experiment != "sequential-batch" or len({r["n_edits"] for r in data}) < 2:
        return None
    base = next((r for r in rows if r.get("method") == "none"), None)
    metrics = metric_keys(cfg, data)
    if not metrics:
        return None
    plt, fig, axes = _figure(metrics, f"sequential {cfg.dataset} edits: metrics after each checkpoint, seed {cfg.seed}")
    lines = dict.fromkeys((r["method"], r["batch_size"]) for r in data)
    for ax, (key, title) in zip(axes, metrics):
        for m, b in lines:
            pts = _points([r for r in data if (r["method"], r["batch_size"]) == (m, b)], "n_edits", key)
            if pts and base is not None and base.get(key) is not None:
                pts = [(0, base[key], (base.get(f"{key}_lo"), base.get(f"{key}_hi")))] + pts
            if pts:
                _line(ax, pts, f"{m.upper()} B={b}")
        if base is not None and base.get(key) is not None:
            ax.axhline(base[key], ls="--", c="grey", lw=1, label="unedited")
        _style(ax, title, "edits so far")
    axes[0].legend(fontsize=7)
    return _save(plt, fig, Path(path))
