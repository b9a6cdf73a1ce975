"""The configuration of one experiment run: a frozen, validated dataclass read from JSON/YAML.

Unknown keys are errors (a misspelt ``batch_size`` silently falling back to a default would
waste a whole run), and the config that produced a run directory is stored in it: resuming
with a different config is refused, because the results already there would not be comparable.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pmedit.fileio import read_mapping
from pmedit.hparams import check_mapping_keys
from pmedit.methods import method_names

EXPERIMENTS = ("layer-sweep", "batch", "sequential-batch", "lambda-sweep")


@dataclass(frozen=True)
class EvalSettings:
    """What is measured after editing: the edit metrics on the edited records (``metric_sets``,
    default the dataset's own, e.g. ES/PS/NS for CounterFact) and model-level ``probes``
    (``downstream``, ``perplexity``) at the baseline and each checkpoint; names from
    pmedit.evaluation.registry, their keyword ``settings`` per name (subsample sizes among them).
    ``every``: sequential-batch also scores every that many batches; ``max_records``: score a
    seeded sample of at most that many of the edits so far; ``budget_s``: metric sets that would
    start after that many seconds of a checkpoint's evaluation are skipped (and listed)."""

    metric_sets: tuple[str, ...] | None = None
    probes: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)
    every: int = 0
    max_records: int | None = None
    budget_s: float | None = None
    batch_size: int | None = None  # sequences per scoring pass (None: 16 on CPU, 64 on GPU)
    generation_accuracy: bool = False
    entropy: bool = False  # GE: sampled texts from the generation prompts
    max_gen_prompts: int = 2  # generation prompts per record used for GE (original has 10)
    gen_length: int = 100
    # GE on a fixed subsample: the generation prompts of ``ge_records`` records (seeded) of
    # ``ge_data`` (original-layout CounterFact; the reduced layout has none), the same at every
    # unit, scored on the model as its first update edits it (as perplexity)
    ge_data: str | None = None
    ge_records: int = 32
    perplexity: bool = False
    ppl_text: str = "../shared/data/text/wikitext2_raw_wiki.test.raw"  # NOT the C0 corpus
    ppl_tokens: int = 4096
    ppl_window: int = 256

    def __post_init__(self):
        for name in ("metric_sets", "probes"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
            v = getattr(self, name)
            if v is not None and (not isinstance(v, tuple) or not all(isinstance(x, str) for x in v)):
                raise ValueError(f"experiment config field 'eval.{name}': expected a list of names, got {v!r}")
        if not isinstance(self.settings, dict) or not all(isinstance(v, dict) for v in self.settings.values()):
            raise ValueError(f"experiment config field 'eval.settings': expected {{metric set: {{setting: value}}}}, "
                             f"got {self.settings!r}")
        if not _is_int(self.every) or self.every < 0:
            raise ValueError(f"experiment config field 'eval.every': a non-negative integer, got {self.every!r}")
        if self.max_records is not None and (not _is_int(self.max_records) or self.max_records < 1):
            raise ValueError(f"experiment config field 'eval.max_records': a positive integer or null, got {self.max_records!r}")
        if self.budget_s is not None and (isinstance(self.budget_s, bool) or not isinstance(self.budget_s, (int, float))
                                          or self.budget_s <= 0):
            raise ValueError(f"experiment config field 'eval.budget_s': a positive number or null, got {self.budget_s!r}")
        if self.ge_data is not None and (not isinstance(self.ge_data, str) or not self.ge_data.strip()):
            raise ValueError(f"experiment config field 'eval.ge_data': a path or null, got {self.ge_data!r}")
        if not _is_int(self.ge_records) or self.ge_records < 1:
            raise ValueError(f"experiment config field 'eval.ge_records': a positive integer, got {self.ge_records!r}")
        if self.ge_data is not None and self.entropy:
            raise ValueError("experiment config field 'eval': GE both on the edited records (eval.entropy) and on a "
                             "fixed subsample (eval.ge_data); use one")
        if self.perplexity and "perplexity" in self.probes:
            raise ValueError("experiment config field 'eval': perplexity is both on (eval.perplexity) and a probe; "
                             "use one")


@dataclass(frozen=True)
class ExperimentConfig:
    """One run of one experiment.

    ``layers``: the edited layer (one entry) or, for ``layer-sweep``, the layers swept.
    ``total_edits``: how many records are used (a seeded sample of ``data``). ``batch_sizes``:
    the batch sizes of ``batch``/``sequential-batch`` (and the one batch size of
    ``lambda-sweep``). ``lambdas``: MEMIT's λ / EMMET's λₑ values. ``hparams``: overrides of
    the preset's EditHparams fields. ``chunk_size``: singular edits per resumable unit in
    ``layer-sweep``. ``eval_points``: edit counts at which ``sequential-batch`` scores all
    edits made so far (the end is always one).
    """

    experiment: str
    data: str
    layers: tuple[int, ...]
    dataset: str = "counterfact"  # how ``data`` is read: counterfact | zsre | requests (pmedit.evaluation.registry)
    methods: tuple[str, ...] = ("memit", "emmet")
    total_edits: int = 64
    batch_sizes: tuple[int, ...] = ()
    lambdas: tuple[float, ...] = ()
    seed: int = 0
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    preset: str | None = "smollm2"
    hparams: dict = field(default_factory=dict)
    chunk_size: int = 16
    eval_points: tuple[int, ...] = ()
    baseline: bool = True  # also score the unedited model
    # batch / lambda-sweep: "independent" splits the records into total_edits/B batches, each on
    # the unedited model, all records scored; "first-b" is the study's literal protocol (the
    # first B records in one batch, those B scored)
    batch_protocol: str = "independent"
    # keys/values reused across units and runs: "default" (PMEDIT_CACHE/values), a path, or None
    value_store: str | None = "default"
    eval: EvalSettings = field(default_factory=EvalSettings)
    out_dir: str | None = None

    def __post_init__(self):
        for name in ("layers", "methods", "batch_sizes", "lambdas", "eval_points"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
            if not isinstance(getattr(self, name), tuple):
                raise ValueError(f"experiment config field {name!r}: expected a list, got {v!r}")
        if isinstance(self.eval, dict):
            object.__setattr__(self, "eval", _build(EvalSettings, self.eval, "experiment config field 'eval'"))
        from pmedit.evaluation.registry import DATASETS, check_metric_sets

        if self.dataset not in DATASETS:
            raise ValueError(f"experiment config field 'dataset': {self.dataset!r} is not one of {sorted(DATASETS)}")
        try:
            check_metric_sets(list(self.edit_metric_sets) + list(self.eval.probes), self.dataset, self.eval.settings)
        except ValueError as e:
            raise ValueError(f"experiment config field 'eval': {e}") from None
        if any(n in self.edit_metric_sets for n in self.eval.probes):
            raise ValueError(f"experiment config field 'eval': {list(self.eval.probes)} are both metric sets and probes")
        from pmedit.evaluation.registry import METRIC_SETS

        level = [n for n in self.eval.probes if METRIC_SETS[n].datasets is not None]
        if level:
            raise ValueError(f"experiment config field 'eval.probes': {level} score edited records; list them "
                             "in eval.metric_sets")
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"experiment config field 'experiment': {self.experiment!r} is not one of {list(EXPERIMENTS)}")
        if not self.layers or any(not _is_int(x) or x < 0 for x in self.layers):
            raise ValueError(f"experiment config field 'layers': expected a non-empty list of layer indices, got {list(self.layers)}")
        if self.experiment != "layer-sweep" and len(self.layers) != 1:
            raise ValueError(f"experiment config field 'layers': {self.experiment} edits one layer, got {list(self.layers)}")
        known = method_names()
        if not self.methods or any(m not in known for m in self.methods):
            raise ValueError(f"experiment config field 'methods': {list(self.methods)}; each must be one of {list(known)}")
        for name in ("total_edits", "chunk_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"experiment config field {name!r}: must be a positive integer, got {getattr(self, name)!r}")
        if any(not _is_int(b) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"experiment config field 'batch_sizes': positive integers required, got {list(self.batch_sizes)}")
        if self.experiment in ("batch", "sequential-batch", "lambda-sweep") and not self.batch_sizes:
            raise ValueError(f"experiment config field 'batch_sizes': {self.experiment} needs at least one")
        too_big = [b for b in self.batch_sizes if b > self.total_edits]
        if too_big:
            raise ValueError(f"experiment config field 'batch_sizes': {too_big} exceed total_edits={self.total_edits}")
        if self.experiment == "sequential-batch":
            bad = [b for b in self.batch_sizes if self.total_edits % b]
            if bad:
                raise ValueError(f"experiment config field 'batch_sizes': {bad} do not divide total_edits={self.total_edits}")
            badp = [p for p in self.eval_points if not _is_int(p) or not 0 < p <= self.total_edits]
            if badp:
                raise ValueError(f"experiment config field 'eval_points': {badp} outside 1..{self.total_edits}")
        if self.batch_protocol not in ("independent", "first-b"):
            raise ValueError(f"experiment config field 'batch_protocol': {self.batch_protocol!r} is not one of "
                             "['independent', 'first-b']")
        if self.experiment in ("batch", "lambda-sweep") and self.batch_protocol == "independent":
            bad = [b for b in self.batch_sizes if self.total_edits % b]
            if bad:
                raise ValueError(f"experiment config field 'batch_sizes': {bad} do not divide total_edits="
                                 f"{self.total_edits} (the independent protocol splits the records into batches)")
        if self.value_store is not None and (not isinstance(self.value_store, str) or not self.value_store.strip()):
            raise ValueError(f"experiment config field 'value_store': a path, \"default\" or null, got {self.value_store!r}")
        if self.experiment == "lambda-sweep":
            if not self.lambdas or any(not isinstance(x, (int, float)) or isinstance(x, bool) or x < 0 for x in self.lambdas):
                raise ValueError(f"experiment config field 'lambdas': non-negative numbers required, got {list(self.lambdas)}")
            if len(self.batch_sizes) != 1:
                raise ValueError("experiment config field 'batch_sizes': lambda-sweep takes exactly one batch size")
        if not isinstance(self.hparams, dict):
            raise ValueError(f"experiment config field 'hparams': expected a mapping, got {type(self.hparams).__name__}")
        for k in ("layers", "method"):
            if k in self.hparams:
                raise ValueError(f"experiment config field 'hparams': set {k!r} with the experiment's own field, not here")
        from pmedit.hparams import EditHparams

        valid = set().union(*({f.name for f in fields(EditHparams.for_method(m))} for m in self.methods))
        unknown = sorted(k for k in self.hparams if k not in valid)
        if unknown:
            raise ValueError(f"experiment config field 'hparams': unknown key(s) {unknown} for methods "
                             f"{list(self.methods)}; valid keys are: {', '.join(sorted(valid))}")

    # -----------------------------------------------------------------------------------
    @property
    def edit_metric_sets(self) -> tuple[str, ...]:
        """The metric sets scored on edited records: eval.metric_sets, else the dataset's own."""
        if self.eval.metric_sets is not None:
            return self.eval.metric_sets
        from pmedit.evaluation.registry import DATASETS

        return DATASETS[self.dataset].metric_sets if self.dataset in DATASETS else ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for sub in (d, d["eval"]):  # as JSON stores them, so a resumed run compares equal
            for k, v in sub.items():
                if isinstance(v, tuple):
                    sub[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "experiment config") -> ExperimentConfig:
        return _build(cls, data, source)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> ExperimentConfig:
        data = read_config_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return _build(cls, data, str(path))

    def edit_hparams(self, method: str, **changes: Any):
        """The EditHparams of ``method`` in this run: the preset, then ``hparams`` (the fields
        this method has: a config for several methods may set one method's own field, e.g.
        EMMET's lam_e, and it applies to that method only), then ``changes``."""
        from pmedit.hparams import EditHparams

        own = {f.name for f in fields(EditHparams.for_method(method))}
        base = {k: v for k, v in self.hparams.items() if k in own}
        base.update(changes)
        base["method"] = method
        base["layers"] = [self.layers[0]]
        if self.preset:
            return EditHparams.preset(self.preset, **base)
        return EditHparams.from_dict(base, source="experiment config 'hparams'")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _build(cls, data: Any, source: str):
    check_mapping_keys(cls, data, source)
    required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {missing}")
    try:
        return cls(**data)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a .json/.yaml config file; a missing file, a parse error or a non-mapping
    is one ValueError/FileNotFoundError naming the file."""
    return read_mapping(path, what="experiment config")
