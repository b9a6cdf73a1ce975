"""Hyperparameters of an edit: the fields every method shares, as a frozen, validated dataclass.

The research code loads its JSON with ``cls(**data)``, so a misspelt key either crashes with a
Python error far from the file or, worse, is silently dropped by a default. Here every key is
checked against the field list (an unknown key is an error that lists the valid ones), every
value against its type and range, and the object is frozen so an Editor's settings cannot drift
after its statistics were collected. Presets hold the settings chosen for a model; they are
plain data in this module (no package data files to lose in an install).

Each method extends :class:`EditHparams` with its own fields in its own file
(``pmedit/methods/``); ``EditHparams.from_dict``/``preset``/``load``/``replace`` build the class
of the method the data names, so ``{"method": "memit", "lam_e": 0.1}`` is refused (MEMIT has no
λₑ) instead of being ignored. A preset is model-level settings here plus each method's own
settings for that model, kept in the method's file.

What this module does not do: pick layers automatically or read model configs; the Editor
checks the layers against the model it edits.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pmedit.fileio import atomic_write_text, read_mapping

PRECISIONS = ("fp64", "fp32")
MOM2_DTYPES = ("float32", "float64")
# value optimisation: pmedit.value_objectives.OBJECTIVES, pmedit.values.ENGINES and DTYPES
# (tests/test_value_engines.py checks that these agree)
VALUE_OBJECTIVES = ("pmedit", "memit")
VALUE_ENGINES = ("full", "cached")
VALUE_DTYPES = ("float32", "bfloat16", "auto")


@dataclass(frozen=True, kw_only=True)
class EditHparams:
    """Everything that changes the numbers of an edit, besides the model and the requests.

    ``lam`` is MEMIT's ``mom2_update_weight``: the preservation matrix is C = lam·C0 with C0 the
    mean second moment of the edited layer's keys.
    ``keep_prior_edits`` adds the keys of every applied batch to C (C ← C + ΣKₚKₚᵀ) so later
    batches preserve earlier edits as well as the corpus.
    """

    layers: tuple[int, ...]
    method: str = "emmet"
    # value optimisation (pmedit.values.optimize_values)
    lr: float = 0.5
    steps: int = 25
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    loss_stop: float = 5e-2
    stop_on_argmax: bool = False
    n_templates: int = 5
    template_length: int = 10
    value_batch_size: int = 16
    key_batch_size: int = 64
    # value_objective: "pmedit", or "memit" (the MEMIT/EMMET authors' compute_z objective, term by
    # term in pmedit/value_objectives.py); value_engine "cached" computes what δ cannot change
    # once per row (pmedit/values_cached.py); value_dtype "bfloat16" runs the frozen model's
    # per-step passes under autocast (δ, Adam and losses stay fp32), "auto" only on hardware
    # with native bf16 matmuls (pmedit.values.native_bf16), fp32 elsewhere
    value_objective: str = "pmedit"
    value_engine: str = "full"
    value_dtype: str = "float32"
    # statistics of the preservation term (pmedit.stats.load_or_collect); mom2_dtype is the
    # dtype C = lam·C0 is factored and held in (float32 halves the d×d memory on large models)
    mom2_corpus: str = "wiki-offline"
    mom2_tokens: int = 100_000
    mom2_dtype: str = "float64"
    # the closed form (pmkernels.solve.pm_delta)
    lam: float = 1.0
    keep_prior_edits: bool = False
    precision: str = "fp64"

    def __new__(cls, *args: Any, **kwargs: Any):
        # EditHparams(...) builds the named method's own class, so its fields are accepted and
        # another method's are refused (e.g. EditHparams(method="memit", lam_e=0.1)).
        if cls is EditHparams:
            cls = EditHparams.for_method(kwargs.get("method", "emmet"), source="EditHparams")
        return object.__new__(cls)

    def __post_init__(self) -> None:
        if isinstance(self.layers, (list, tuple)):
            object.__setattr__(self, "layers", tuple(self.layers))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if not self.layers:
            raise ValueError("EditHparams field 'layers': at least one layer is required")
        for i, layer in enumerate(self.layers):
            if layer < 0:
                raise ValueError(f"EditHparams field 'layers': entry {i} is {layer}, must be >= 0")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(
                f"EditHparams field 'layers': {list(self.layers)} must be strictly increasing "
                "(MEMIT spreads the residual from the first to the last layer)"
            )
        _choice("method", self.method, _method_names())
        _choice("precision", self.precision, PRECISIONS)
        _choice("mom2_dtype", self.mom2_dtype, MOM2_DTYPES)
        _choice("value_objective", self.value_objective, VALUE_OBJECTIVES)
        _choice("value_engine", self.value_engine, VALUE_ENGINES)
        _choice("value_dtype", self.value_dtype, VALUE_DTYPES)
        _positive("lr", self.lr)
        _positive("clamp_norm_factor", self.clamp_norm_factor)
        _positive("lam", self.lam)
        _check_lambdas(self.lam, getattr(self, "lam_e", None))
        for name in ("kl_factor", "weight_decay", "loss_stop"):
            _non_negative(name, getattr(self, name))
        for name in ("steps", "n_templates"):
            _non_negative(name, getattr(self, name))
        for name in ("template_length", "value_batch_size", "key_batch_size", "mom2_tokens"):
            _positive(name, getattr(self, name))
        if not self.mom2_corpus.strip():
            raise ValueError("EditHparams field 'mom2_corpus': must not be empty")

    # ---- conversion -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "hyperparameters") -> EditHparams:
        """Build the named method's hyperparameters (``method`` defaults to emmet) from a mapping,
        refusing keys that are not its fields (a typo, or another method's field, is an error)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of field names, got {type(data).__name__}")
        target = cls.for_method(data.get("method", "emmet"), source=source)
        check_mapping_keys(target, data, source)
        if "layers" not in data:
            raise ValueError(f"{source}: missing required key 'layers'")
        return target(**data)

    @classmethod
    def resolve(cls, hparams: Any, *, method: str | None = None, layers: Any = None,
                where: str = "hparams") -> EditHparams:
        """The method's own hyperparameters from an EditHparams, a preset name or a mapping,
        with ``method``/``layers`` overriding theirs (``hparams=None`` needs ``layers``)."""
        overrides: dict[str, Any] = {}
        if method is not None:
            overrides["method"] = str(method).lower()
        if layers is not None:
            overrides["layers"] = [layers] if isinstance(layers, int) else list(layers)
        if hparams is None:
            if "layers" not in overrides:
                raise ValueError(f"{where}: give layers=[...] or hparams (an EditHparams or a preset name)")
            return EditHparams.from_dict(overrides, source=f"{where} arguments")
        if isinstance(hparams, str):
            return EditHparams.preset(hparams, **overrides)
        if isinstance(hparams, dict):
            hp = EditHparams.from_dict(dict(hparams), source=f"{where} hparams")
        elif isinstance(hparams, EditHparams):
            hp = hparams
        else:
            raise TypeError(f"{where}: hparams must be an EditHparams, a preset name or a mapping, "
                            f"got {type(hparams).__name__}")
        return hp.replace(**overrides) if overrides else hp

    @classmethod
    def for_method(cls, method: Any, *, source: str = "hyperparameters") -> type[EditHparams]:
        """The hyperparameter class of ``method`` (from the method registry); called on a
        method's own class it also checks that ``method`` is that method."""
        from pmedit.methods import get_method

        if not isinstance(method, str):
            raise ValueError(f"{source}: field 'method' must be a string, got {method!r}")
        try:
            target = get_method(method).hparams
        except ValueError as e:
            raise ValueError(f"{source}: field 'method': {e}") from None
        if cls is not EditHparams and target is not cls:
            raise ValueError(f"{source}: {cls.__name__} holds method {cls.method_name()!r}, not {method!r}")
        return target

    @classmethod
    def method_name(cls) -> str:
        return next(f.default for f in fields(cls) if f.name == "method")

    def replace(self, **changes: Any) -> EditHparams:
        """A copy with some fields changed, validated like a new object (unknown names refused).

        Changing ``method`` keeps the shared fields; fields that only the old method has are
        dropped (the new method's own fields take their defaults), unless given in ``changes``,
        where a field the new method lacks is an error.
        """
        merged = self.to_dict()
        if "method" in changes and changes["method"] != self.method:
            target = EditHparams.for_method(changes["method"], source="EditHparams.replace")
            own = {f.name for f in fields(target)}
            merged = {k: v for k, v in merged.items() if k in own}
        merged.update(changes)
        return EditHparams.from_dict(merged, source="EditHparams.replace")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, *, source: str = "JSON") -> EditHparams:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON: {e}") from None
        return cls.from_dict(data, source=source)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "YAML") -> EditHparams:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{source}: not valid YAML: {e}") from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON or YAML (by extension) through a temp file so a crash never leaves half a file."""
        path = Path(path)
        text = self.to_yaml() if _is_yaml(path) else self.to_json() + "\n"
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditHparams:
        """Read .json or .yaml/.yml (by extension); errors name the file."""
        return cls.from_dict(read_mapping(path, what="hyperparameters file"), source=str(path))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EditHparams:
        """The settings chosen for a model: the model-level preset, then the method's own preset
        of that name (``overrides["method"]`` picks the method, else the preset's), then
        ``overrides``."""
        from pmedit.methods import get_method

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        data = dict(PRESETS[name])
        if cls is not EditHparams:
            data["method"] = cls.method_name()
        data["method"] = overrides.get("method", data["method"])
        data.update(get_method(data["method"]).presets.get(name, {}))
        data.update(overrides)
        return EditHparams.from_dict(data, source=f"preset {name!r}")


# Model-level presets (a method's own fields for a preset live in its file, e.g. EMMET's λₑ).
# SmolLM2-135M (30 layers, d=1536 keys, 576 hidden): layer 4 and λ=100 from a small sweep on the
# real model (the 6 example facts in one batch, 15 steps, 2 templates, C0 from 10k tokens;
# benchmarks/RESULTS.md, Editor): EMMET at layers 2/4/6/8 all wrote 6/6 edits that also hold
# under a prefixed paraphrase, but layer 6 broke an unrelated neighbour ("capital of Spain") and
# layer 4 had the smaller update of the two early layers; MEMIT at layer 4 wrote 6/6 with λ=100
# and only 3/6 with λ=10⁴ (MEMIT's GPT-J weight, too strong a preservation for C0 from this
# model). For EMMET λ only scales the ridge (C = λC0 makes λₑ act as λ·λₑ on KᵀC0⁻¹K).
# Llama-3-8B: layer 1, as in the batch-size study of Llama-3 editing (Yoon, Gupta &
# Anumanchipalli 2024, "Is bigger edit batch size always better?", whose layer sweep found layer
# 1 best for MEMIT/EMMET); the remaining settings follow the unified-editing (EMMET) configs for
# Llama models: clamp 4, weight decay 1e-3, 25 steps at lr 0.5, λ=1 on the mean second moment,
# λₑ=0.1, statistics from 100k Wikipedia tokens.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "layers": [4],
        "method": "emmet",
        "lam": 100.0,
        "clamp_norm_factor": 4.0,
        "weight_decay": 1e-3,
        "mom2_tokens": 100_000,
    },
    "llama3-8b": {
        "layers": [1],
        "method": "emmet",
        "lr": 0.5,
        "steps": 25,
        "kl_factor": 0.0625,
        "weight_decay": 1e-3,
        "clamp_norm_factor": 4.0,
        "lam": 1.0,
        "mom2_tokens": 100_000,
        "value_batch_size": 8,
        "key_batch_size": 16,
    },
}


def check_mapping_keys(cls, data: Any, source: str) -> None:
    """A mapping whose keys are all fields of the dataclass ``cls``: a misspelt key is an error
    naming it and the valid ones, never a silent fall-back to a default."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of field names, got {type(data).__name__}")
    valid = [f.name for f in fields(cls)]
    unknown = sorted(k for k in data if k not in valid)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys are: {', '.join(valid)}")


def _method_names() -> tuple[str, ...]:
    from pmedit.methods import method_names

    return method_names()


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _check_type(name: str, value: Any, annotation: Any) -> None:
    ann = str(annotation)
    if ann.startswith("tuple"):
        if not isinstance(value, tuple) or not all(_is_int(v) for v in value):
            raise ValueError(f"EditHparams field {name!r}: expected a list of integers, got {value!r}")
    elif ann == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"EditHparams field {name!r}: expected true/false, got {value!r}")
    elif ann == "int":
        if not _is_int(value):
            raise ValueError(f"EditHparams field {name!r}: expected an integer, got {value!r}")
    elif ann == "float":
        # ints are accepted for floats (JSON writes 1.0 as 1); bools are not numbers here
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"EditHparams field {name!r}: expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"EditHparams field {name!r}: must be finite, got {value!r}")
    elif ann == "str":
        if not isinstance(value, str):
            raise ValueError(f"EditHparams field {name!r}: expected a string, got {value!r}")
    else:  # pragma: no cover - a new field with an unhandled annotation is a programming error
        raise TypeError(f"EditHparams field {name!r}: unhandled annotation {ann}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"EditHparams field {name!r}: {value!r} is not one of {', '.join(allowed)}")


# Limits of λ and λₑ. Edit keys have kᵀC0⁻¹k ≈ d (10³..10⁵), so with C = λ·C0 the ridge λₑ
# swamps kᵀC⁻¹k ≈ d/λ once λ·λₑ ≫ d, and the update shrinks by ≈ d/(λ·λₑ): beyond λ·λₑ = 1e6
# nothing lands, silently. λ outside [1e-6, 1e8] is no setting in use (MEMIT's is 1.5e4) but a
# typo, and at 1e300 λ·C0 overflows.
LAM_RANGE = (1e-6, 1e8)
LAM_E_MAX = 1e6
LAM_LAM_E_MAX = 1e6


def _check_lambdas(lam: float, lam_e: float | None) -> None:
    lo, hi = LAM_RANGE
    if not lo <= lam <= hi:
        raise ValueError(f"EditHparams field 'lam': {lam!r} is outside [{lo:g}, {hi:g}] "
                         "(MEMIT uses 15000; far outside, C = lam·C0 overflows or the update vanishes)")
    if lam_e is None or not lam_e >= 0:  # a negative or NaN lam_e is the method's own check
        return
    if lam_e > LAM_E_MAX:
        raise ValueError(f"EditHparams field 'lam_e': {lam_e!r} is above {LAM_E_MAX:g}; the ridge would swamp "
                         "every edit (typical values: 0.01-10)")
    if lam * lam_e > LAM_LAM_E_MAX:
        raise ValueError(f"EditHparams fields 'lam' and 'lam_e': lam·lam_e = {lam * lam_e:g} is above "
                         f"{LAM_LAM_E_MAX:g}; the update would shrink by about d/(lam·lam_e) and no edit would land")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"EditHparams field {name!r}: must be > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"EditHparams field {name!r}: must be >= 0, got {value!r}")
