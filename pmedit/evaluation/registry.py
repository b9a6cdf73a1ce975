"""Datasets and metric sets by name: what an experiment config names and the runner looks up.

A dataset turns a file into records (``counterfact``, ``zsre``, ``requests`` — an edit request
file); a metric set scores records (or, for ``downstream`` and ``perplexity``, the model as it
stands) and returns a flat summary dict. The runner and the plots read the metric keys from
those summaries, so a new metric is one :func:`register_metric_set` call (plus its module).

Not here: the scoring itself (the modules beside this one).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DatasetSpec", "MetricSet", "DATASETS", "METRIC_SETS", "register_dataset", "register_metric_set",
           "load_dataset", "run_metric_sets", "shared_data_dir", "check_metric_sets", "headline_keys"]


def shared_data_dir() -> Path:
    """``$PMEDIT_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("PMEDIT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable  # (path, limit) -> records
    default_path: str | None  # relative to shared_data_dir(); None: a path is required
    metric_sets: tuple[str, ...]  # the edit metrics that apply by default


@dataclass(frozen=True)
class MetricSet:
    name: str
    run: Callable  # (model, tok, records, *, edits, groups, **settings) -> summary dict
    datasets: tuple[str, ...] | None  # datasets whose records it scores; None: model-level (records unused)
    settings: tuple[str, ...] = ()  # the keyword settings it accepts
    headline: tuple[str, ...] | Callable = ()  # summary keys a figure shows (or settings -> keys)


DATASETS: dict[str, DatasetSpec] = {}
METRIC_SETS: dict[str, MetricSet] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def register_metric_set(ms: MetricSet) -> MetricSet:
    if ms.name in METRIC_SETS:
        raise ValueError(f"metric set {ms.name!r} is already registered")
    METRIC_SETS[ms.name] = ms
    return ms


def _load_counterfact(path, limit):
    from pmedit.data import load_counterfact

    return load_counterfact(path, limit=limit)


def _load_zsre(path, limit):
    from pmedit.data import load_zsre

    return load_zsre(path, limit=limit)


def _load_requests(path, limit):
    from pmedit.fileio import read_json_records
    from pmedit.requests import normalize_requests

    try:
        reqs = normalize_requests(read_json_records(path, allow_single=True))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if not reqs:
        raise ValueError(f"{path}: holds no requests")
    return reqs[:limit] if limit is not None else reqs


register_dataset(DatasetSpec("counterfact", _load_counterfact, "counterfact/counterfact_original_500.json",
                             ("counterfact",)))
register_dataset(DatasetSpec("zsre", _load_zsre, "zsre/locft_zsre_3k.json", ("zsre",)))
register_dataset(DatasetSpec("requests", _load_requests, None, ("exact_match",)))


def load_dataset(name: str, path: str | Path | None = None, *, limit: int | None = None) -> list:
    """Records of a registered dataset, from ``path`` or the dataset's file in the shared data."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    if path is None:
        if spec.default_path is None:
            raise ValueError(f"dataset {name!r} needs a path")
        path = shared_data_dir() / spec.default_path
    return spec.load(Path(path), limit)


# ------------------------------------------------------------------------------ metric sets
def _counterfact(model, tok, records, *, edits=None, groups=None, **kw):
    from pmedit.evaluation.counterfact import evaluate_counterfact

    return evaluate_counterfact(model, tok, records, edits=edits, groups=groups, progress=False, **kw).summary


def _zsre(model, tok, records, *, edits=None, groups=None, **kw):
    from pmedit.evaluation.zsre import evaluate_zsre

    return evaluate_zsre(model, tok, records, edits=edits, groups=groups, **kw).summary


def _exact_match(model, tok, records, *, edits=None, groups=None, **kw):
    from pmedit.evaluation.exact_match import evaluate_exact_match

    return evaluate_exact_match(model, tok, records, edits=edits, groups=groups, **kw).summary


def _downstream(model, tok, records=None, *, edits=None, groups=None, tasks: Sequence[str] | None = None,
                limit: int | None = 200, shots: int = 0, data_dir=None, batch_size=None):
    """``{task}_acc`` (+ ``_f1``, ``_mcc`` for binary tasks) for each task, on the first ``limit``
    records of each file (a fixed subsample: the same examples before and after edits)."""
    from pmedit.evaluation.downstream import TASKS, load_task, score_task

    if groups is not None:
        raise ValueError("downstream probes score the model as edited, not per record group")
    out: dict = {}
    for name in tasks if tasks is not None else list(TASKS):
        ex = load_task(name, data_dir, limit=None if limit is None else limit + shots)
        s = score_task(model, tok, name, ex, shots=shots, batch_size=batch_size, edits=edits).summary
        out.update({f"{name}_{k}": v for k, v in s.items() if k in ("acc", "f1", "mcc")})
    return out


def _perplexity(model, tok, records=None, *, edits=None, groups=None, text: str | None = None,
                tokens: int = 20_000, window: int = 256):
    from pmedit.evaluation.perplexity import load_heldout_text, perplexity

    if edits is not None or groups is not None:
        raise ValueError("perplexity scores the model as edited; per-group updates are not supported")
    path = Path(text) if text else shared_data_dir() / "text" / "wikitext2_raw_wiki.test.raw"
    return {"ppl": perplexity(model, tok, load_heldout_text(path, max_chars=tokens * 8), max_tokens=tokens,
                              window=window)["ppl"]}


def _downstream_headline(settings: Mapping) -> tuple[str, ...]:
    from pmedit.evaluation.downstream import TASKS

    tasks = settings.get("tasks") or list(TASKS)
    return tuple(f"{t}_{TASKS[t].primary}" for t in tasks if t in TASKS)


register_metric_set(MetricSet("counterfact", _counterfact, ("counterfact",),
                              ("batch_size", "generation_accuracy", "entropy", "max_gen_prompts", "gen_length"),
                              ("es", "ps", "ns", "score", "gen_acc", "ge")))
register_metric_set(MetricSet("zsre", _zsre, ("zsre",), ("batch_size",), ("zsre_es", "zsre_ps", "zsre_ns")))
register_metric_set(MetricSet("exact_match", _exact_match, ("counterfact", "zsre", "requests"), ("batch_size",),
                              ("em_rewrite", "em_paraphrase")))
register_metric_set(MetricSet("downstream", _downstream, None, ("tasks", "limit", "shots", "data_dir", "batch_size"),
                              _downstream_headline))
register_metric_set(MetricSet("perplexity", _perplexity, None, ("text", "tokens", "window"), ("ppl",)))


def headline_keys(names: Sequence[str], settings: Mapping[str, Mapping] | None = None) -> list[str]:
    """The summary keys the named metric sets put in a figure, in order."""
    out: list[str] = []
    for n in names:
        h = METRIC_SETS[n].headline
        keys = h(dict((settings or {}).get(n, {}))) if callable(h) else h
        out += [k for k in keys if k not in out]
    return out


def check_metric_sets(names: Sequence[str], dataset: str, settings: Mapping[str, Mapping] | None = None) -> None:
    """Unknown names, a metric set that does not score this dataset, or unknown settings: an
    error naming them (raised at configuration time, not halfway through a run)."""
    for n in names:
        if n not in METRIC_SETS:
            raise ValueError(f"unknown metric set {n!r}; known: {sorted(METRIC_SETS)}")
        ms = METRIC_SETS[n]
        if ms.datasets is not None and dataset not in ms.datasets:
            raise ValueError(f"metric set {n!r} scores {list(ms.datasets)}, not dataset {dataset!r}")
    for n, kw in (settings or {}).items():
        if n not in METRIC_SETS:
            raise ValueError(f"settings for unknown metric set {n!r}; known: {sorted(METRIC_SETS)}")
        bad = sorted(set(kw) - set(METRIC_SETS[n].settings))
        if bad:
            raise ValueError(f"metric set {n!r}: unknown setting(s) {bad}; valid: {list(METRIC_SETS[n].settings)}")


def run_metric_sets(model, tok, records: Sequence, names: Sequence[str], *, dataset: str, edits=None,
                    groups: Sequence[int] | None = None, settings: Mapping[str, Mapping] | None = None) -> dict:
    """One flat summary from the named metric sets (each also reports ``{name}_seconds``).
    Model-level sets (downstream, perplexity) ignore ``records`` and never see ``groups``."""
    check_metric_sets(names, dataset, settings)
    out: dict = {}
    for n in names:
        ms = METRIC_SETS[n]
        kw = dict((settings or {}).get(n, {}))
        t0 = time.perf_counter()
        if ms.datasets is None:
            s = ms.run(model, tok, None, edits=edits, **kw)
        else:
            s = ms.run(model, tok, records, edits=edits, groups=groups, **kw)
        for k, v in s.items():
            if k in out and out[k] != v:
                raise ValueError(f"metric sets disagree on {k!r}: {out[k]!r} vs {v!r} (from {n!r})")
            out[k] = v
        out[f"{n}_seconds"] = time.perf_counter() - t0
    return out
