"""What a method is, and the context it edits through.

A method is one function ``edit_batch(ctx, requests)`` that computes its per-layer updates from
the :class:`EditContext` and writes each through ``ctx.write``. The context offers everything
the locate-and-edit methods share: keys, values and outputs at the subject (computed in chunks
on the current weights), the factored preservation matrix of each layer, the closed-form solve,
and a checked write. It belongs to one batch: the Editor snapshots the weights before it and
puts them back if the batch raises, and only a batch that completes commits the context's
preservation updates and method state. So a method never has to think about atomicity.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from pmedit.hparams import EditHparams
from pmkernels.solve import pm_delta, rank_one_delta
from pmkernels.spd import SPDFactor, rank_update

if TYPE_CHECKING:
    from pmedit.report import BatchReport

log = logging.getLogger(__name__)

_VALUE_DEFAULTS = {"objective": "pmedit", "engine": "full", "dtype": "float32"}  # pmedit.values.optimize_values'


class EditError(RuntimeError):
    """A batch could not be applied; the weights are as they were before it."""


@dataclass(frozen=True)
class Method:
    """One editing method: its name, hyperparameters and algorithm.

    ``sweep_field``: the hyperparameter a λ-sweep varies. ``presets``: the method's own fields
    per model preset (merged over the model-level preset of the same name). ``uses_preservation``:
    whether the Editor must compute C0 and factor λ·C0 before the first edit. ``check_batch``
    runs before any expensive work of a batch (value optimisation) to refuse what cannot work.
    ``solve_groups(ctx, K, R, group_size)``: the updates of many independent batches of one layer
    at once, as low-rank factors (pmedit.groups; optional), for groups of at most
    ``solve_groups_max`` edits (None: any; larger groups are edited one by one).
    ``preservation_matrix(hp, C0)``:
    the matrix the Editor factors for each layer (default λ·C0;
    ENCORE adds μ·I).
    """

    name: str
    hparams: type[EditHparams]
    edit_batch: Callable[[EditContext, list], None]
    sweep_field: str
    summary: str
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    uses_preservation: bool = True
    check_batch: Callable[[EditHparams, int, int], None] | None = None
    preservation_matrix: Callable[[EditHparams, torch.Tensor], torch.Tensor] | None = None
    solve_groups: Callable[[EditContext, torch.Tensor, torch.Tensor, int], list] | None = None
    solve_groups_max: int | None = None


class EditContext:
    """The shared machinery one batch of one method edits through; see the module docstring."""

    def __init__(self, editor, report: BatchReport, *, where: str):
        self._ed = editor
        self.hparams: EditHparams = editor.hparams
        self.model = editor.model
        self.tokenizer = editor.tokenizer
        self.spec = editor.spec
        self.layers: tuple[int, ...] = editor.layers
        self.templates: list[str] = editor.templates
        self.report = report
        self.where = where
        self.progress = editor.progress
        # Batch-local copies, committed by the Editor only when the batch completes.
        self.factors: dict[int, SPDFactor] = dict(editor._factors)
        self.kept_keys: dict[int, list[torch.Tensor]] = {k: list(v) for k, v in editor._kept_keys.items()}
        self.state: dict[str, torch.Tensor] = dict(editor.method_state)
        self._written = False
        # Derived data a method may keep for the Editor's lifetime (a projector, a factor), never
        # saved and not batch-local: only for what is a pure function of its own key.
        self.cache: dict = editor.method_cache
        self.cache_dir = editor.cache_dir

    @property
    def d(self) -> int:
        return self.spec.intermediate_size

    # ------------------------------------------------------------------ preservation
    def preservation(self, layer: int) -> SPDFactor:
        """The factor of this layer's preservation matrix: λ·C0, plus every kept batch's KKᵀ."""
        return self.factors[layer]

    def second_moment(self, layer: int) -> torch.Tensor:
        """C0 of ``layer`` (fp64 [d, d]) from the unedited model (cached on disk)."""
        return self._ed.second_moment(layer)

    def keep_keys(self, layer: int, K: torch.Tensor) -> None:
        """Add KKᵀ to the preservation of ``layer`` for the rest of this batch and (once it
        completes) every later batch: C ← C + KKᵀ through a rank update, O(d²E)."""
        fac = self.factors[layer]
        K = K.to(device=fac.device, dtype=fac.dtype)
        self.factors[layer] = rank_update(fac, K)
        self.kept_keys.setdefault(layer, []).append(K.detach().to("cpu", torch.float64))

    # ---------------------------------------------------------------------- solves
    def solve(self, R: torch.Tensor, K: torch.Tensor, layer: int, *, ridge: float) -> torch.Tensor:
        """Δ = R (KᵀC⁻¹K + ridge·I)⁻¹ KᵀC⁻¹ on the current preservation of ``layer``."""
        return self._run_solve(lambda R, K, fac: pm_delta(R, K, fac, ridge=ridge, precision=self.hparams.precision),
                               R, K, layer)

    def solve_rank_one(self, R: torch.Tensor, K: torch.Tensor, layer: int) -> torch.Tensor:
        """The one-edit update r (C⁻¹k)ᵀ/(kᵀC⁻¹k) on the current preservation of ``layer``."""
        return self._run_solve(lambda R, K, fac: rank_one_delta(R, K, fac, precision=self.hparams.precision),
                               R, K, layer)

    def _run_solve(self, fn, R, K, layer) -> torch.Tensor:
        rep = self.report
        fac = self.factors[layer]
        t0 = time.perf_counter()
        try:
            res = fn(R.to(fac.device, torch.float64), K.to(fac.device, torch.float64), fac)
        except ValueError as e:
            raise ValueError(f"{self.where}, layer {layer}: {e}") from e
        rep.seconds_solve += time.perf_counter() - t0
        rep.jitter[layer] = max(rep.jitter.get(layer, 0.0), float(res.jitter), float(res.inner_jitter))
        rep.cond_estimates[layer] = max(rep.cond_estimates.get(layer, 0.0), float(res.cond_estimate))
        rep.residuals[layer] = max(rep.residuals.get(layer, 0.0), float(res.residual))
        return res.delta

    # ---------------------------------------------------------------------- writes
    def weight(self, layer: int) -> torch.nn.Parameter:
        return self.spec.down_proj(self.model, layer).weight

    def write(self, layer: int, delta: torch.Tensor) -> None:
        """W ← W + Δ now (later keys see it), summed in fp64 and rounded once to W's dtype.

        Checked after rounding (an fp16 overflow is caught as well as a NaN in Δ); the
        Editor undoes every write of the batch if anything later in it fails.
        """
        if layer not in self.layers:
            raise EditError(f"{self.where}: layer {layer} is not one of this Editor's layers {list(self.layers)}")
        W, where = self.weight(layer), f"{self.where}, layer {layer}"
        if tuple(delta.shape) != tuple(W.shape):
            raise EditError(f"{where}: delta for layer {layer} has shape {tuple(delta.shape)}, the weight {tuple(W.shape)}")
        with torch.no_grad():
            new = (W.detach().to(torch.float64) + delta.to(device=W.device, dtype=torch.float64)).to(W.dtype)
        new = finite_or_error(new, f"{where}: the update of layer {layer} ({self.spec.down_proj_name(layer)})")
        self._written = True
        with torch.no_grad():
            self.weight(layer).copy_(new)

    # ------------------------------------------------------- keys, values, outputs
    def _chunks(self, reqs: list, size: int, desc: str):
        starts = range(0, len(reqs), size)
        bar = tqdm(starts, desc=desc, unit="chunk", disable=not self.progress or len(starts) <= 1, leave=False)
        for s in bar:
            yield reqs[s:s + size]

    def _store(self):
        """The Editor's value store while the weights are the unedited ones (no earlier batch,
        no write yet in this one), else None: only then are stored keys and values valid."""
        store = self._ed.value_store
        return store if store is not None and self._ed.n_edits == 0 and not self._written else None

    def _stored(self, kind: str, reqs: list, layer: int, settings: dict, compute, fields: tuple[str, ...]):
        """Per-request tensors ``fields`` from the store, computing (and storing, chunk by chunk,
        so a killed run keeps what it finished) the missing ones with ``compute(chunk)``."""
        from pmedit.value_store import entry_key

        store = self._store()
        if store is None:
            return [compute(chunk) for chunk in self._chunks(reqs, self._chunk_size(kind), kind)]
        keys = [entry_key(kind, self._ed.fingerprint, layer, settings, self.templates, r) for r in reqs]
        found = store.get_many(keys)
        self.report.extra["store_hits"] = self.report.extra.get("store_hits", 0) + sum(f is not None for f in found)
        todo = [i for i, f in enumerate(found) if f is None]
        for idx in (todo[s:s + self._chunk_size(kind)] for s in range(0, len(todo), self._chunk_size(kind))):
            out = compute([reqs[i] for i in idx])
            entries = {keys[i]: {f: out[f][j] for f in fields} for j, i in enumerate(idx)}
            store.put_many(entries)
            for j, i in enumerate(idx):
                found[i] = entries[keys[i]]
        return [{f: torch.stack([found[i][f] for i in range(len(reqs))]) for f in fields}] if reqs else []

    def _chunk_size(self, kind: str) -> int:
        hp = self.hparams
        return hp.value_batch_size if kind == "values" else max(hp.key_batch_size, 256)

    def keys(self, reqs: list, layer: int) -> torch.Tensor:
        """K [d, E] in fp64 (CPU): the keys of ``reqs`` at ``layer`` on the current weights."""
        from pmedit.keys import compute_keys

        hp = self.hparams
        t0 = time.perf_counter()

        def compute(chunk):
            k = compute_keys(self.model, self.tokenizer, self.spec, layer, chunk, self.templates,
                             batch_size=hp.key_batch_size)
            if tuple(k.shape) != (len(chunk), self.d):
                raise EditError(f"compute_keys returned {tuple(k.shape)} for {len(chunk)} requests at layer "
                                f"{layer}; expected [{len(chunk)}, {self.d}]")
            return {"key": k.detach().to(device="cpu", dtype=torch.float64)}

        parts = self._stored("keys", reqs, layer, {}, compute, ("key",))
        K = torch.cat([p["key"] for p in parts]).mT.contiguous()
        self.report.seconds_keys += time.perf_counter() - t0
        return K

    def values(self, reqs: list, layer: int, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, h) [E, hidden] fp64: optimised targets and current outputs of ``layer``.

        Optimised in chunks of ``value_batch_size`` to bound memory (or read from the Editor's
        value store); per-edit losses and steps go into the report; a non-finite target is an
        EditError naming the request. ``options`` override or extend the keyword arguments given
        to ``optimize_values`` (a method with its own stopping rule passes it here); the store
        keys entries by exactly those arguments.
        """
        from pmedit.values import optimize_values, resolve_value_dtype

        hp, rep = self.hparams, self.report
        t0 = time.perf_counter()
        kwargs = dict(lr=hp.lr, steps=hp.steps, kl_factor=hp.kl_factor, weight_decay=hp.weight_decay,
                      clamp_norm_factor=hp.clamp_norm_factor, loss_stop=hp.loss_stop,
                      stop_on_argmax=hp.stop_on_argmax, batch_size=hp.value_batch_size)
        # Only settings that differ from optimize_values' defaults, so stored entries keep their keys;
        # "auto" resolved first: the store keys values by the dtype that computed them.
        dtype = resolve_value_dtype(hp.value_dtype, self.spec.down_proj(self.model, layer).weight.device)
        kwargs.update({k: v for k, v in (("objective", hp.value_objective), ("engine", hp.value_engine),
                                         ("dtype", dtype)) if v != _VALUE_DEFAULTS[k]})
        kwargs.update(options)

        def compute(chunk):
            res = optimize_values(self.model, self.tokenizer, self.spec, layer, chunk, self.templates, **kwargs)
            z, h = res.z.detach(), res.h.detach()
            if tuple(z.shape) != (len(chunk), self.spec.hidden_size) or z.shape != h.shape:
                raise EditError(f"optimize_values returned z {tuple(z.shape)}, h {tuple(h.shape)} for "
                                f"{len(chunk)} requests; expected [{len(chunk)}, {self.spec.hidden_size}]")
            return {"z": z.to(device="cpu", dtype=torch.float64), "h": h.to(device="cpu", dtype=torch.float64),
                    "loss": torch.tensor(_per_edit(res.losses, len(chunk), "losses", float), dtype=torch.float64),
                    "steps": torch.tensor(_per_edit(res.steps, len(chunk), "steps", int), dtype=torch.int64)}

        parts = self._stored("values", reqs, layer, kwargs, compute, ("z", "h", "loss", "steps"))
        Z, H = torch.cat([p["z"] for p in parts]), torch.cat([p["h"] for p in parts])
        rep.value_losses.extend(float(x) for p in parts for x in p["loss"].tolist())
        rep.value_steps.extend(int(x) for p in parts for x in p["steps"].tolist())
        rep.seconds_values += time.perf_counter() - t0
        bad = ~(torch.isfinite(Z).all(dim=1) & torch.isfinite(H).all(dim=1))
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise EditError(f"{self.where}: value optimisation produced a non-finite target for request {row} of "
                            f"the batch (case_id={reqs[row].case_id!r}); no weights were changed by this batch")
        return Z, H

    def outputs_at_subject(self, reqs: list, layer: int) -> torch.Tensor:
        """Output of ``layer`` at each subject's last token of the bare prompt, current weights.

        The same position and prompt as value optimisation's h (pmedit.tokens), so that for the
        first layer of a spread this equals h; causal attention makes the target tokens that
        value optimisation appends irrelevant here.
        """
        from pmedit.hooks import Trace
        from pmedit.tokens import encode_subject_prompt, pad_batch, pad_id

        name = self.spec.layer_name(layer)
        device = self.weight(layer).device
        pad = pad_id(self.tokenizer)
        out = []
        for chunk in self._chunks(reqs, self.hparams.key_batch_size, f"outputs L{layer}"):
            enc = [encode_subject_prompt(self.tokenizer, r, None) for r in chunk]
            ids, mask = pad_batch([e.ids for e in enc], pad, device)
            with torch.no_grad(), Trace(self.model, name, retain_output=True, stop=True) as tr:
                tr.run(input_ids=ids, attention_mask=mask)
            hidden = tr.outputs[name]
            pos = torch.tensor([e.subject_last for e in enc], device=hidden.device)
            out.append(hidden[torch.arange(len(enc), device=hidden.device), pos].detach().double().cpu())
        return torch.cat(out)


def finite_or_error(new: torch.Tensor, what: str) -> torch.Tensor:
    """``new`` if every entry is finite, else an EditError naming ``what`` and the first culprit."""
    bad = ~torch.isfinite(new)
    if bool(bad.any()):
        raise EditError(f"{what} has {int(bad.sum())} non-finite entries (first at "
                        f"{tuple(bad.nonzero()[0].tolist())}); no weights were changed by this batch")
    return new


def _per_edit(x: Any, n: int, what: str, cast) -> list:
    """One number per edit from whatever optimize_values reports (tensor, list, or a scalar)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.ndim == 0:
            return [cast(x.item())] * n
        if x.ndim == 2:  # [steps, E] history: the last row is the final loss
            x = x[-1]
        x = x.tolist()
    if isinstance(x, (int, float)):
        return [cast(x)] * n
    x = list(x)
    if len(x) != n:
        raise EditError(f"optimize_values reported {len(x)} {what} for {n} requests")
    return [cast(v) for v in x]
