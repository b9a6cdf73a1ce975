"""Figures of the study's shape from result rows (matplotlib, Agg, small PNGs).

One panel per metric (ES, PS, NS, S; plus perplexity and GE when measured), one line per
method; the unedited model, when scored, is a dashed line. The x axis is what the experiment
varies: layer, batch size (log scale) or λ.
"""
from __future__ import annotations

from pathlib import Path

from pmedit.fileio import atomic_path

METRICS = [("es", "ES"), ("ps", "PS"), ("ns", "NS"), ("score", "S"), ("ppl", "perplexity"), ("ge", "GE")]
XAXIS = {"layer-sweep": ("layer", "edited layer"), "batch": ("batch_size", "batch size"),
         "sequential-batch": ("batch_size", "batch size (sequential)"), "lambda-sweep": ("lam", "λ (MEMIT) / λₑ (EMMET)")}


def plot_rows(cfg, rows: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    xkey, xlabel = XAXIS[cfg.experiment]
    base = next((r for r in rows if r.get("method") == "none"), None)
    data = [r for r in rows if r.get("method") != "none"]
    if cfg.experiment == "sequential-batch":  # the figure shows the end of each sequence
        data = [r for r in data if r.get("n_edits") == cfg.total_edits]
    metrics = [(k, t) for k, t in METRICS if any(r.get(k) is not None for r in data)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 2.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        for m in dict.fromkeys(r["method"] for r in data):
            pts = sorted((r[xkey], r[key]) for r in data if r["method"] == m and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=m.upper())
        if base is not None and base.get(key) is not None:
            ax.axhline(base[key], ls="--", c="grey", lw=1, label="unedited")
        if cfg.experiment in ("batch", "sequential-batch"):
            ax.set_xscale("log", base=2)
        if cfg.experiment == "lambda-sweep" and all(r[xkey] > 0 for r in data):
            ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{cfg.experiment}: {cfg.total_edits} CounterFact edits, seed {cfg.seed}", fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return path
