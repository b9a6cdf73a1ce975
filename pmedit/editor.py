"""The editing engine's orchestration: batches, atomicity, restore, deltas, continuing.

An :class:`Editor` owns the edited ``down_proj`` matrices of one model and runs one registered
method (:mod:`pmedit.methods`) over batches of requests. It keeps an exact copy of the original
weights (``restore`` is bit-exact), factors each layer's preservation matrix C = λ·C0 once from
the unedited model and reuses it, and applies each batch atomically: the method writes through a
batch-local :class:`~pmedit.methods.EditContext`, and any exception (a non-finite value, a failed
solve, a KeyboardInterrupt) puts the weights back exactly and discards the batch's state.

Batches run one after another on the model left by the previous batch (keys and values are
recomputed on the current weights): ``batch_size=len(requests)`` is batch editing,
``batch_size=1`` sequential editing and anything between sequential-batched editing.

Edits travel as deltas files (:mod:`pmedit.deltas`: bit-exact, payload-hashed, checked against
the model). ``Editor.load_deltas(model, path, tokenizer=tok)`` returns an Editor that can go on
editing where the saved one stopped: statistics and templates are computed on the original
weights (swapped in for the moment it takes), and kept keys and method state come from the file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pmedit.hparams import EditHparams
from pmedit.methods import EditContext, EditError, get_method
from pmedit.models import ModelSpec
from pmedit.report import BatchReport, EditReport, relative
from pmkernels.spd import SPDFactor, rank_update

log = logging.getLogger(__name__)

__all__ = ["Editor", "EditError", "BatchReport", "EditReport"]


class Editor:
    """Edit facts in ``model`` with a registered method; see the module docstring.

    ``method`` and ``layers`` override the same fields of ``hparams`` (an :class:`EditHparams`,
    a preset name or a mapping); with no ``hparams``, ``layers`` is required.
    ``second_moments`` ({layer: C0 [d, d]}) replaces the statistics pmedit.stats would collect
    (the layers must match); ``cache_dir`` is where those statistics are cached. ``templates``
    replaces the generated context templates. ``context_class`` (an EditContext subclass)
    changes where keys and values come from (fakes in tests, say). ``value_store`` (a
    :class:`~pmedit.value_store.ValueStore` or its directory) reuses the keys and values of
    records already computed on these unedited weights with these settings.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, method: str | None = None,
                 layers: Sequence[int] | None = None, hparams: EditHparams | str | Mapping | None = None, *,
                 cache_dir: str | os.PathLike | None = None,
                 second_moments: Mapping[int, torch.Tensor] | None = None, progress: bool = True,
                 templates: Sequence[str] | None = None, context_class: type[EditContext] = EditContext,
                 value_store: Any = None) -> None:
        self.hparams = EditHparams.resolve(hparams, method=method, layers=layers, where="Editor")
        self.method_impl = get_method(self.hparams.method)
        self.model, self.tokenizer = model, tokenizer
        self.spec = ModelSpec.from_model(model)
        self.cache_dir, self.progress = cache_dir, progress
        self.layers: tuple[int, ...] = self.hparams.layers
        self.module_names = {layer: self.spec.down_proj_name(layer) for layer in self.layers}  # range-checked
        with torch.no_grad():
            self._original = {layer: self._weight(layer).detach().clone() for layer in self.layers}
        self._c0 = _check_second_moments(second_moments, self.layers, self.spec.intermediate_size) \
            if second_moments else None
        self._base_factors: dict[int, SPDFactor] = {}
        self._factors: dict[int, SPDFactor] = {}
        self._kept_keys: dict[int, list[torch.Tensor]] = {}
        self.method_state: dict[str, torch.Tensor] = {}
        self.method_cache: dict[Any, Any] = {}  # EditContext.cache: derived data, never saved
        self._templates: list[str] | None = list(templates) if templates is not None else None
        self.context_class = context_class
        self.value_store = _open_store(value_store)
        self.n_edits = 0
        self.reports: list[EditReport] = []

    @property
    def method(self) -> str:
        return self.hparams.method

    @property
    def fingerprint(self) -> str:
        """The unedited model's fingerprint (taken when this Editor was made)."""
        return self.spec.fingerprint

    @property
    def templates(self) -> list[str]:
        self.prepare()
        return self._templates

    def preservation(self, layer: int) -> SPDFactor:
        """The factor of ``layer``'s preservation matrix as the next batch will use it (λ·C0,
        plus the keys of kept edits)."""
        self.prepare()
        return self._factors[layer]

    def _weight(self, layer: int) -> torch.nn.Parameter:
        return self.spec.down_proj(self.model, layer).weight

    def _weights_now(self) -> dict[int, torch.Tensor]:
        return {layer: self._weight(layer).detach().clone() for layer in self.layers}

    def _write_all(self, weights: Mapping[int, torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, new in weights.items():
                self._weight(layer).copy_(new)

    # ------------------------------------------------------------ preparation (once)
    def prepare(self) -> None:
        """Pay the one-time costs now: context templates, C0 (cached on disk) and its factors.

        Both come from the original weights: if this Editor's layers are edited (deltas were
        loaded), the originals are swapped in while they are computed and the edits put back.
        ``edit`` does this itself on first use; calling it first separates that cost (benchmarks,
        the CLI).
        """
        need_factors = self.method_impl.uses_preservation and len(self._base_factors) != len(self.layers)
        if self._templates is not None and not need_factors:
            return
        if self.tokenizer is None:
            raise ValueError("this Editor has no tokenizer (it was made by load_deltas without one); pass tokenizer=")
        from pmedit.models import check_finite

        check_finite(self.model)  # an inf would surface as a sampling error in template generation
        with self._originals_in_place():
            if self._templates is None:
                from pmedit.keys import context_templates

                hp = self.hparams
                self._templates = context_templates(self.model, self.tokenizer, n=hp.n_templates,
                                                    length=hp.template_length, seed=0)
            if need_factors:
                self._make_factors()

    @contextlib.contextmanager
    def _originals_in_place(self):
        """The original weights in the model for the duration (the edits put back exactly after):
        templates and statistics (cached by the model's fingerprint) belong to the unedited model,
        even when asked for mid-sequence or after some layers of a batch were written."""
        edited = self._weights_now() if any(not torch.equal(self._weight(i), self._original[i])
                                            for i in self.layers) else None
        try:
            if edited is not None:
                self._write_all(self._original)
            yield
        finally:
            if edited is not None:
                self._write_all(edited)

    def second_moment(self, layer: int) -> torch.Tensor:
        """C0 of ``layer`` (fp64 [d, d]): given, or from the on-disk statistics cache."""
        if self._c0 is not None:
            return self._c0[layer].to(torch.float64)
        from pmedit.stats import load_or_collect

        hp = self.hparams
        with self._originals_in_place():
            stats = load_or_collect(self.model, self.tokenizer, list(self.layers), corpus=hp.mom2_corpus,
                                    max_tokens=hp.mom2_tokens, cache_dir=self.cache_dir, progress=self.progress)
        return stats[layer].mean

    def _make_factors(self) -> None:
        hp = self.hparams
        dtype = torch.float64 if hp.mom2_dtype == "float64" else torch.float32
        for layer in self.layers:
            device = self._weight(layer).device
            C0 = self.second_moment(layer).to(device=device, dtype=torch.float64)
            build = self.method_impl.preservation_matrix
            C = (build(hp, C0) if build is not None else hp.lam * C0).to(dtype)
            self._base_factors[layer] = SPDFactor(C, name=f"C (layer {layer})")
        self._factors = dict(self._base_factors)
        for layer, Ks in self._kept_keys.items():  # a loaded sequence: replay its rank updates
            for K in Ks:
                fac = self._factors[layer]
                self._factors[layer] = rank_update(fac, K.to(device=fac.device, dtype=fac.dtype))

    # -------------------------------------------------------------------------- edit
    def edit(self, requests: Iterable[Any], batch_size: int | None = None) -> EditReport:
        """Apply ``requests`` in batches of ``batch_size`` (default: all in one batch).

        Each batch is atomic; if one fails, the batches before it stay applied (and are in
        ``self.reports`` via the partial report attached to the exception as ``.report``).
        """
        from pmedit.requests import normalize_requests

        if self.tokenizer is None:
            raise ValueError("this Editor has no tokenizer (it was made by load_deltas without one); pass tokenizer=")
        reqs = normalize_requests(requests)
        if not reqs:
            raise ValueError("edit: no requests given")
        B = len(reqs) if batch_size is None else batch_size
        if isinstance(B, bool) or not isinstance(B, int) or B < 1:
            raise ValueError(f"edit: batch_size must be a positive integer, got {batch_size!r}")
        if self.method_impl.check_batch is not None:  # before any statistics or value optimisation
            self.method_impl.check_batch(self.hparams, min(B, len(reqs)), self.spec.intermediate_size)
        t0 = time.perf_counter()
        self.prepare()
        report = EditReport(self.method, list(self.layers), B, len(reqs), [], 0.0)
        starts = range(0, len(reqs), B)
        bar = tqdm(starts, desc=f"{self.method} batches", unit="batch", disable=not self.progress or len(starts) == 1)
        for b, s in enumerate(bar):
            try:
                report.batches.append(self._edit_batch(b, reqs[s:s + B]))
            except BaseException as e:
                report.seconds = time.perf_counter() - t0
                if report.batches:
                    self.reports.append(report)
                if isinstance(e, Exception):
                    e.report = report  # type: ignore[attr-defined]
                raise
        report.seconds = time.perf_counter() - t0
        self.reports.append(report)
        if report.unconverged:
            log.warning("%s", report.summary())
        else:
            log.info("%s", report.summary())
        return report

    def _edit_batch(self, index: int, reqs: list) -> BatchReport:
        """One batch through the method, atomically: all of it or (on any exception) none."""
        t0 = time.perf_counter()
        rep = BatchReport(index=index, n_edits=len(reqs), case_ids=[r.case_id for r in reqs],
                          seconds=0.0, value_losses=[], value_steps=[])
        before = self._weights_now()
        ctx = self.context_class(self, rep, where=f"batch {index}")
        try:
            self.method_impl.edit_batch(ctx, reqs)
        except BaseException:
            self._write_all(before)  # exact copies: the batch never happened
            raise
        self._factors, self._kept_keys, self.method_state = ctx.factors, ctx.kept_keys, ctx.state
        self.n_edits += len(reqs)
        with torch.no_grad():
            for layer in self.layers:
                rep.update_norms[layer] = float((self._weight(layer).double() - before[layer].double()).norm())
                rep.relative_update_norms[layer] = relative(rep.update_norms[layer], float(before[layer].double().norm()))
        rep.mark_unconverged(self.hparams.loss_stop)
        rep.seconds = time.perf_counter() - t0
        return rep

    # ----------------------------------------------------------------------- restore
    def restore(self) -> None:
        """Put back the exact original weights and forget every edit, kept key and method state."""
        self._write_all(self._original)
        self._factors = dict(self._base_factors)
        self._kept_keys, self.method_state = {}, {}
        self.n_edits = 0
        self.reports = []

    # ----------------------------------------------------------------- save and load
    def deltas(self) -> dict[int, torch.Tensor]:
        """Current weights minus the originals, in twice the weight precision (fp64 for fp32)."""
        from pmedit.deltas import split_delta

        with torch.no_grad():
            return {layer: split_delta(self._original[layer], self._weight(layer))[0] for layer in self.layers}

    def save_deltas(self, path: str | os.PathLike) -> Path:
        """Write the edits (and what continuing them needs) as a verified deltas file, atomically."""
        from pmedit.deltas import write_deltas

        meta = {"method": self.method, "layers": list(self.layers), "model_fingerprint": self.spec.fingerprint,
                "model_type": self.spec.model_type, "n_edits": self.n_edits, "hparams": self.hparams.to_dict(),
                "templates": self._templates}
        with torch.no_grad():
            out = write_deltas(path, originals=self._original, current=self._weights_now(),
                               module_names=self.module_names, meta=meta, kept_keys=self._kept_keys,
                               state=self.method_state)
        log.info("saved %d edit(s) on layers %s to %s", self.n_edits, list(self.layers), path)
        return out

    @classmethod
    def load_deltas(cls, model: torch.nn.Module, path: str | os.PathLike, *, tokenizer: Any = None,
                    hparams: EditHparams | None = None, **options: Any) -> Editor:
        """Apply a deltas file to the unedited ``model`` and return the Editor that holds the edits.

        Everything is checked before anything is written: the payload hash, the fingerprint, every
        module's name, shape, dtype and the SHA-256 of its original matrix. ``restore()`` undoes
        the load. With a ``tokenizer`` the Editor can continue the sequence (``edit``);
        ``hparams``, if given, must equal the saved ones (continuing with other settings would
        mix two experiments). ``options`` are the Editor's own keyword arguments (cache_dir,
        second_moments, progress, templates, context_class); the saved templates are used unless
        ``templates`` is given.
        """
        from pmedit.deltas import edited_weights, read_deltas

        f = read_deltas(path)
        saved = EditHparams.from_dict(f.meta["hparams"], source=f"{f.path} metadata 'hparams'")
        if hparams is not None and EditHparams.resolve(hparams).to_dict() != saved.to_dict():
            raise ValueError(f"{f.path}: saved with other hyperparameters than given: {saved.to_dict()}")
        options.setdefault("templates", f.meta.get("templates"))
        editor = cls(model, tokenizer, hparams=saved, **options)
        new = edited_weights(f, editor._original, editor.module_names, editor.fingerprint)
        try:
            editor._write_all(new)
        except BaseException:
            editor._write_all(editor._original)
            raise
        editor.n_edits = int(f.meta.get("n_edits", 0))
        editor._kept_keys, editor.method_state = f.kept_keys, f.state
        log.info("loaded %d edit(s) on layers %s from %s", editor.n_edits, list(editor.layers), f.path)
        return editor


# ------------------------------------------------------------------------------ helpers
def _check_second_moments(c0: Mapping[int, torch.Tensor], layers: tuple[int, ...], d: int) -> dict[int, torch.Tensor]:
    missing = [layer for layer in layers if layer not in c0]
    if missing:
        raise ValueError(f"second_moments: no C0 for layer(s) {missing} (given for {sorted(c0)})")
    for layer in layers:
        t = c0[layer]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (d, d):
            raise ValueError(f"second_moments[{layer}]: expected a [{d}, {d}] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return {layer: c0[layer] for layer in layers}


def _open_store(store: Any):
    if store is None:
        return None
    from pmedit.value_store import ValueStore

    return store if isinstance(store, ValueStore) else ValueStore(store)
