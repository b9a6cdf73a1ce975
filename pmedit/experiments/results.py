"""An experiment's result rows (one per scored unit, every metric key its summaries hold) and the
files they go to: results.json (config, machine, rows, value-store reuse, dropped conflicts),
results.csv and the plot."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmedit.evaluation.metrics import RecordScores, bootstrap_intervals, summarize
from pmedit.experiments.config import ExperimentConfig
from pmedit.experiments.store import write_csv
from pmedit.fileio import atomic_write_json, machine_info

if TYPE_CHECKING:
    from pmedit.experiments.runner import Unit


def _row(cfg, u: Unit | None, res: dict, **extra) -> dict:
    # every metric key the summaries hold (a new metric set adds its keys here by itself)
    row = {"experiment": cfg.experiment, **extra}
    row.update({k: v for k, v in res["summary"].items() if k != "n_records"})
    if res.get("ppl") is not None or "ppl" not in row:
        row["ppl"] = res.get("ppl")
    for k in ("edit_seconds", "seconds_values", "seconds_keys", "seconds_solve", "eval_seconds", "n_groups",
              "unconverged", "kck_mean", "kck_median", "value_steps_mean"):
        if k in res or k in ("edit_seconds", "eval_seconds"):
            row[k] = res.get(k)
    return row


def _merge_chunks(chunks: list[dict], seed: int = 0) -> dict:
    """One summary from layer-sweep chunks: CounterFact's from all per-record scores (S is a
    harmonic mean, not a mean of chunk means); every other key a mean of per-record means over
    the chunks that report it, i.e. their values weighted by their record counts (GE is measured
    in the first chunk only); seconds summed."""
    out: dict[str, Any] = {}
    recs = [RecordScores(**r) for c in chunks for r in c.get("records", [])]
    if recs:
        out.update(summarize(recs))
        out.update(bootstrap_intervals(recs, seed=seed))
    n = [c["summary"].get("n_records") or 0 for c in chunks]
    out["n_records"] = sum(n)
    for k in dict.fromkeys(k for c in chunks for k in c["summary"]):
        if out.get(k) is not None:
            continue
        vals = [(c["summary"][k], w) for c, w in zip(chunks, n) if c["summary"].get(k) is not None]
        if k.endswith("_seconds"):
            out[k] = sum(v for v, _ in vals if v is not None)
        elif vals and all(isinstance(v, (int, float)) for v, _ in vals) and sum(w for _, w in vals):
            out[k] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
        else:
            out[k] = None
    return out


def collect_rows(cfg: ExperimentConfig, units: list[Unit], done: dict) -> list[dict]:
    rows = []
    if "baseline" in done:
        rows.append(_row(cfg, None, done["baseline"], method="none", layer=cfg.layers[0], batch_size=0, n_edits=0))
    if cfg.experiment == "layer-sweep":
        groups: dict[tuple[str, int], list[Unit]] = {}
        for u in units:
            if u.kind == "singular":
                groups.setdefault((u.method, u.layer), []).append(u)
        for (m, layer), us in groups.items():
            if not all(u.key in done for u in us):
                continue
            res = {
                "summary": _merge_chunks([done[u.key] for u in us], seed=cfg.seed),
                "edit_seconds": sum(done[u.key]["edit_seconds"] for u in us),
                "eval_seconds": sum(done[u.key]["eval_seconds"] for u in us),
                "ppl": done[us[0].key].get("ppl"),  # the model of the first chunk's first edit
            }
            for k in ("seconds_values", "seconds_keys", "seconds_solve", "unconverged"):
                if all(k in done[u.key] for u in us):
                    res[k] = sum(done[u.key][k] for u in us)
            per_chunk = [done[u.key]["summary"].get("n_records") or 0 for u in us]
            n = sum(per_chunk)
            if all(done[u.key].get("value_steps_mean") is not None for u in us):  # weighted by the chunks' edits
                res["value_steps_mean"] = sum(done[u.key]["value_steps_mean"] * k for u, k in zip(us, per_chunk)) / max(n, 1)
            rows.append(_row(cfg, None, res, method=m, layer=layer, batch_size=1, n_edits=n))
    else:
        for u in units:
            if u.kind == "baseline" or u.key not in done or "summary" not in done[u.key]:
                continue
            r = done[u.key]
            n = r.get("n_edits", u.batch_size)
            extra = {"method": u.method, "layer": u.layer, "batch_size": u.batch_size, "n_edits": n}
            if u.kind == "lambda":
                extra["lam"] = u.lam
            if u.kind == "seq":  # the time of every batch up to this score, not just the last
                extra["edit_seconds_total"] = sum(
                    done[f"{u.method}/S{u.batch_size}/batch{k}"]["edit_seconds"] for k in range(u.index + 1)
                )
            rows.append(_row(cfg, u, r, **extra))
    return rows


def store_summary(store) -> dict | None:
    """Lookups, computations and reuse factor of this invocation's key/value store."""
    if store is None:
        return None
    return {"path": str(store.root), "entries": len(store), "lookups": store.hits + store.misses,
            "computed": store.misses, "reuse_factor": store.reuse_factor()}


def write_results(cfg: ExperimentConfig, root: Path, rows: list[dict], plot: bool, *,
                   value_store: dict | None = None, conflicts_dropped: int = 0,
                   units: dict | None = None) -> dict:
    """``units`` ({"done", "total"}) tells a report of a run in progress from a finished run."""
    atomic_write_json(root / "results.json", {"config": cfg.to_dict(), "machine": machine_info(), "rows": rows,
                                              "value_store": value_store, "conflicts_dropped": conflicts_dropped,
                                              "units": units})
    write_csv(root / "results.csv", rows)
    out = {"rows": rows, "out_dir": str(root), "value_store": value_store, "units": units}
    if plot:
        from pmedit.experiments.plots import plot_progress, plot_rows

        out["plot"] = str(plot_rows(cfg, rows, root / f"{cfg.experiment}.png"))
        prog = plot_progress(cfg, rows, root / f"{cfg.experiment}-progress.png")
        if prog is not None:
            out["plot_progress"] = str(prog)
    return out
