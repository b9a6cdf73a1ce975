"""The editing engine: ROME, MEMIT and EMMET in batches, applied atomically and reversibly.

An :class:`Editor` owns the edited ``down_proj`` matrices of one model. It keeps an exact copy
of their original weights (``restore`` is bit-exact), factors each layer's preservation matrix
C = λ·C0 once and reuses the factor for every batch (updated by a rank update when earlier
edits are kept in C), and applies each batch atomically: every delta of the batch is computed
and checked finite before the batch counts, and any exception (a non-finite value, a failed
solve, a KeyboardInterrupt) puts the weights back exactly as they were before that batch.

Batches run one after another on the model left by the previous batch (keys and values are
recomputed on the current weights), so ``batch_size=len(requests)`` is batch editing,
``batch_size=1`` sequential editing and anything between sequential-batched editing.

Deltas travel between processes as safetensors with JSON metadata (``save_deltas`` /
``Editor.load_deltas``); the metadata names the modules, shapes, dtypes, the model fingerprint
and a SHA-256 of each original matrix, and loading refuses anything that does not match.

Not here: keys (:mod:`pmedit.keys`), values (:mod:`pmedit.values`), statistics
(:mod:`pmedit.stats`) or the linear algebra (:mod:`pmkernels.solve`); evaluation lives in
:mod:`pmedit.evaluate`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pmedit.hparams import EditHparams
from pmedit.models import ModelSpec
from pmkernels.solve import SPDFactor, pm_delta, rank_update

log = logging.getLogger(__name__)

DELTAS_FORMAT = "pmedit-deltas/1"
_META_KEY = "pmedit"


# ------------------------------------------------------------------------------- reports
@dataclass
class BatchReport:
    """What one batch did; per-layer dicts are keyed by layer index.

    ``update_norms`` is ‖ΔW‖_F of the batch (the weights after minus before), ``relative_...``
    divides by ‖W‖_F before the batch. ``jitter`` is the largest absolute Cholesky jitter any
    solve of the batch needed (0.0: none), ``cond_estimates`` the condition estimate of the
    factored d×d matrix, ``residuals`` the relative residual pm_delta reports for its system.
    """

    index: int
    n_edits: int
    case_ids: list[Any]
    seconds: float
    value_losses: list[float]
    value_steps: list[int]
    update_norms: dict[int, float] = field(default_factory=dict)
    relative_update_norms: dict[int, float] = field(default_factory=dict)
    jitter: dict[int, float] = field(default_factory=dict)
    cond_estimates: dict[int, float] = field(default_factory=dict)
    residuals: dict[int, float] = field(default_factory=dict)
    seconds_values: float = 0.0
    seconds_keys: float = 0.0
    seconds_solve: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("update_norms", "relative_update_norms", "jitter", "cond_estimates", "residuals"):
            d[k] = {str(layer): v for layer, v in d[k].items()}
        return d


@dataclass
class EditReport:
    """The batches of one ``Editor.edit`` call, in order."""

    method: str
    layers: list[int]
    batch_size: int
    n_edits: int
    batches: list[BatchReport]
    seconds: float

    @property
    def value_losses(self) -> list[float]:
        return [x for b in self.batches for x in b.value_losses]

    def to_dict(self) -> dict:
        return {
            "method": self.method, "layers": list(self.layers), "batch_size": self.batch_size,
            "n_edits": self.n_edits, "seconds": self.seconds, "batches": [b.to_dict() for b in self.batches],
        }

    def summary(self) -> str:
        norms = [max(b.relative_update_norms.values(), default=0.0) for b in self.batches]
        losses = self.value_losses
        return (
            f"{self.method} on layers {self.layers}: {self.n_edits} edits in {len(self.batches)} batch(es) of "
            f"<= {self.batch_size}, {self.seconds:.1f}s; final value loss mean "
            f"{(sum(losses) / len(losses)) if losses else float('nan'):.3f}; largest relative update "
            f"{max(norms, default=0.0):.2e}"
        )


class EditError(RuntimeError):
    """A batch could not be applied; the weights are as they were before it."""


# -------------------------------------------------------------------------------- editor
class Editor:
    """Edit facts in ``model`` with ROME, MEMIT or EMMET; see the module docstring.

    ``method`` and ``layers`` override the same fields of ``hparams`` (an :class:`EditHparams`,
    a preset name or a mapping); with no ``hparams``, ``layers`` is required.
    ``second_moments`` ({layer: C0 [d, d]}) replaces the statistics pmedit.stats would collect
    (the layers must match); ``cache_dir`` is where those statistics are cached.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        method: str | None = None,
        layers: Sequence[int] | None = None,
        hparams: EditHparams | str | Mapping | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        second_moments: Mapping[int, torch.Tensor] | None = None,
        progress: bool = True,
    ) -> None:
        self.hparams = _resolve_hparams(hparams, method, layers)
        self.model = model
        self.tokenizer = tokenizer
        self.spec = ModelSpec.from_model(model)
        self.cache_dir = cache_dir
        self.progress = progress
        self.layers: tuple[int, ...] = self.hparams.layers
        self.module_names = {layer: self.spec.down_proj_name(layer) for layer in self.layers}  # range-checked
        with torch.no_grad():
            self._original = {layer: self._weight(layer).detach().clone() for layer in self.layers}
        self._second_moments = _check_second_moments(second_moments, self.layers, self._d) if second_moments else None
        self._base_factors: dict[int, SPDFactor] = {}
        self._factors: dict[int, SPDFactor] = {}
        self._templates: list[str] | None = None
        self.n_edits = 0
        self.reports: list[EditReport] = []

    # ------------------------------------------------------------------ small accessors
    @property
    def method(self) -> str:
        return self.hparams.method

    @property
    def _d(self) -> int:
        return self.spec.intermediate_size

    def _weight(self, layer: int) -> torch.Tensor:
        return self.spec.down_proj(self.model, layer).weight

    def _weights_now(self) -> dict[int, torch.Tensor]:
        return {layer: self._weight(layer).detach().clone() for layer in self.layers}

    # -------------------------------------------------------------- preparation (once)
    def prepare(self) -> None:
        """Pay the one-time costs now: context templates, C0 (cached on disk) and its factors.

        ``edit`` does this itself on first use; calling it first separates that cost from the
        edits' own time (benchmarks, the CLI).
        """
        self._prepare()

    def _prepare(self) -> None:
        """Templates and factors of C, computed from the weights before this Editor's first write.

        Both must come from the unedited model (the statistics of a later layer depend on the
        earlier layers' weights), so they are computed on first use while no edit is applied.
        """
        if self._templates is not None and len(self._factors) == len(self.layers):
            return
        if self.n_edits and any(
            not torch.equal(self._weight(layer), self._original[layer]) for layer in self.layers
        ):  # pragma: no cover - only reachable if preparation failed after edits were loaded
            raise EditError("statistics must be computed on the unedited model; call restore() first")
        if self._templates is None:
            self._templates = self._context_templates()
        if len(self._factors) != len(self.layers):
            self._make_factors()

    def _context_templates(self) -> list[str]:
        from pmedit.keys import context_templates

        if self.tokenizer is None:
            raise ValueError("this Editor has no tokenizer (it was made by load_deltas without one); pass tokenizer=")
        hp = self.hparams
        return context_templates(self.model, self.tokenizer, n=hp.n_templates, length=hp.template_length, seed=0)

    def _make_factors(self) -> None:
        hp = self.hparams
        if self._second_moments is not None:
            c0 = dict(self._second_moments)
        else:
            from pmedit.stats import load_or_collect

            stats = load_or_collect(
                self.model, self.tokenizer, list(self.layers), corpus=hp.mom2_corpus,
                max_tokens=hp.mom2_tokens, cache_dir=self.cache_dir, progress=self.progress,
            )
            c0 = {layer: stats[layer].mean for layer in self.layers}
        dtype = torch.float64 if hp.mom2_dtype == "float64" else torch.float32
        for layer in self.layers:
            device = self._weight(layer).device
            C = (hp.lam * c0[layer].to(device=device, dtype=torch.float64)).to(dtype)
            fac = SPDFactor(C, name=f"C (layer {layer})")
            self._base_factors[layer] = fac
            self._factors[layer] = fac
            log.debug("layer %d: factored λ·C0 (jitter %.3g)", layer, fac.jitter)

    # ------------------------------------------------------------------------ editing
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
        t0 = time.perf_counter()
        self._prepare()
        report = EditReport(self.method, list(self.layers), B, len(reqs), [], 0.0)
        starts = range(0, len(reqs), B)
        bar = tqdm(starts, desc=f"{self.method} batches", unit="batch", disable=not self.progress or len(starts) == 1)
        for b, s in enumerate(bar):
            batch = reqs[s:s + B]
            try:
                report.batches.append(self._edit_batch_atomic(b, batch))
            except BaseException as e:
                report.seconds = time.perf_counter() - t0
                if report.batches:
                    self.reports.append(report)
                if isinstance(e, Exception):
                    e.report = report  # type: ignore[attr-defined]
                raise
        report.seconds = time.perf_counter() - t0
        self.reports.append(report)
        log.info("%s", report.summary())
        return report

    def _edit_batch_atomic(self, index: int, reqs: list) -> BatchReport:
        before = self._weights_now()
        try:
            report, new_factors = self._edit_batch(index, reqs, before)
        except BaseException:
            self._write_all(before)  # exact copies: the batch never happened
            raise
        # Only a batch that completed changes the Editor's state besides the weights.
        self._factors.update(new_factors)
        self.n_edits += len(reqs)
        return report

    def _edit_batch(self, index: int, reqs: list, before: dict[int, torch.Tensor]):
        t0 = time.perf_counter()
        hp = self.hparams
        rep = BatchReport(index=index, n_edits=len(reqs), case_ids=[r.case_id for r in reqs],
                          seconds=0.0, value_losses=[], value_steps=[])
        new_factors: dict[int, SPDFactor] = {}
        if hp.method == "rome":
            # ROME is a rank-one update per fact: the edits of a batch go in one after another,
            # each on the weights left by the previous one.
            fac = self._factors[self.layers[0]]
            for j, r in enumerate(reqs):
                fac = self._solve_and_write([r], fac, rep, where=f"batch {index}, request {j}")
            if hp.keep_prior_edits:
                new_factors[self.layers[0]] = fac
        else:
            new_factors = self._spread_and_write(reqs, rep, where=f"batch {index}")
            if not hp.keep_prior_edits:
                new_factors = {}
        with torch.no_grad():
            for layer in self.layers:
                W = self._weight(layer)
                dW = W.double() - before[layer].double()
                rep.update_norms[layer] = float(dW.norm())
                base = float(before[layer].double().norm())
                rep.relative_update_norms[layer] = rep.update_norms[layer] / base if base > 0 else math.inf
        rep.seconds = time.perf_counter() - t0
        return rep, new_factors

    def _solve_and_write(self, reqs: list, fac: SPDFactor, rep: BatchReport, *, where: str) -> SPDFactor:
        """ROME for one request: value, key, rank-one delta, checked write; returns the next factor."""
        layer = self.layers[0]
        Z, H, _, _ = self._checked_values(reqs, layer, rep, where=where)
        K = self._keys(reqs, layer, rep)  # [d, 1]
        R = (Z - H).mT  # [d_out, 1]
        delta = self._delta("rome", R, K, fac, layer, rep, where=where)
        self._write_all(self._checked_new_weights({layer: delta}, where=where))
        return rank_update(fac, K.to(device=fac.device, dtype=fac.dtype)) if self.hparams.keep_prior_edits else fac

    def _spread_and_write(self, reqs: list, rep: BatchReport, *, where: str) -> dict[int, SPDFactor]:
        """MEMIT's algorithm (also used for EMMET): z at the last layer, residual spread over layers.

        For layer i of L: keys at that layer on the current weights, the current output of the
        last layer at the subject, and R = (z − h_cur)/(L − i); layer i is written before layer
        i+1's keys are computed, since those keys depend on it. With one layer this is just
        R = z − h.
        """
        hp = self.hparams
        last = self.layers[-1]
        Z, H, _, _ = self._checked_values(reqs, last, rep, where=where)
        new_factors: dict[int, SPDFactor] = {}
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            K = self._keys(reqs, layer, rep)
            if i > 0:
                H = self._outputs_at_subject(reqs, last)
            R = ((Z - H) / (n - i)).mT
            fac = self._factors[layer]
            delta = self._delta(hp.method, R, K, fac, layer, rep, where=f"{where}, layer {layer}")
            new = self._checked_new_weights({layer: delta}, where=f"{where}, layer {layer}")
            self._write_all(new)
            if hp.keep_prior_edits:
                new_factors[layer] = rank_update(fac, K.to(device=fac.device, dtype=fac.dtype))
        return new_factors

    def _delta(self, method: str, R: torch.Tensor, K: torch.Tensor, fac: SPDFactor, layer: int,
               rep: BatchReport, *, where: str) -> torch.Tensor:
        hp = self.hparams
        t0 = time.perf_counter()
        dev = fac.device
        try:
            res = pm_delta(method, R.to(dev, torch.float64), K.to(dev, torch.float64), fac,
                           lam_e=0.0 if method == "rome" else hp.lam_e, precision=hp.precision)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        rep.seconds_solve += time.perf_counter() - t0
        rep.jitter[layer] = max(rep.jitter.get(layer, 0.0), float(res.jitter), float(res.inner_jitter))
        rep.cond_estimates[layer] = max(rep.cond_estimates.get(layer, 0.0), float(res.cond_estimate))
        rep.residuals[layer] = max(rep.residuals.get(layer, 0.0), float(res.residual))
        return res.delta

    def _checked_new_weights(self, deltas: Mapping[int, torch.Tensor], *, where: str) -> dict[int, torch.Tensor]:
        """W + Δ for every layer, summed in fp64 and rounded once to the weight's dtype.

        Checked after rounding, so an fp16 overflow is caught as well as a NaN in Δ. Nothing is
        written here: the caller writes only once every new weight of the step is known good.
        """
        out = {}
        with torch.no_grad():
            for layer, delta in deltas.items():
                W = self._weight(layer)
                if tuple(delta.shape) != tuple(W.shape):
                    raise EditError(f"{where}: delta for layer {layer} has shape {tuple(delta.shape)}, "
                                    f"the weight {tuple(W.shape)}")
                new = (W.detach().to(torch.float64) + delta.to(device=W.device, dtype=torch.float64)).to(W.dtype)
                bad = ~torch.isfinite(new)
                if bool(bad.any()):
                    raise EditError(
                        f"{where}: the update of layer {layer} ({self.module_names[layer]}) has "
                        f"{int(bad.sum())} non-finite entries (first at {tuple(bad.nonzero()[0].tolist())}); "
                        "no weights were changed by this batch"
                    )
                out[layer] = new
        return out

    def _write_all(self, weights: Mapping[int, torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, new in weights.items():
                self._write(layer, new)

    def _write(self, layer: int, new: torch.Tensor) -> None:
        self._weight(layer).copy_(new)

    # ---------------------------------------------------------- keys, values, outputs
    def _chunks(self, reqs: list, size: int, desc: str):
        starts = range(0, len(reqs), size)
        bar = tqdm(starts, desc=desc, unit="chunk", disable=not self.progress or len(starts) <= 1, leave=False)
        for s in bar:
            yield reqs[s:s + size]

    def _values(self, reqs: list, layer: int, rep: BatchReport):
        """z and h [E, hidden] for the output of ``layer``, optimised in chunks to bound memory."""
        from pmedit.values import optimize_values

        hp = self.hparams
        t0 = time.perf_counter()
        Zs, Hs = [], []
        for chunk in self._chunks(reqs, hp.value_batch_size, "values"):
            res = optimize_values(
                self.model, self.tokenizer, self.spec, layer, chunk, self._templates,
                lr=hp.lr, steps=hp.steps, kl_factor=hp.kl_factor, weight_decay=hp.weight_decay,
                clamp_norm_factor=hp.clamp_norm_factor, loss_stop=hp.loss_stop,
                stop_on_argmax=hp.stop_on_argmax, batch_size=hp.value_batch_size,
            )
            z, h = res.z.detach(), res.h.detach()
            if tuple(z.shape) != (len(chunk), self.spec.hidden_size) or z.shape != h.shape:
                raise EditError(f"optimize_values returned z {tuple(z.shape)}, h {tuple(h.shape)} for "
                                f"{len(chunk)} requests; expected [{len(chunk)}, {self.spec.hidden_size}]")
            Zs.append(z.to(device="cpu", dtype=torch.float64))
            Hs.append(h.to(device="cpu", dtype=torch.float64))
            rep.value_losses.extend(_per_edit(res.losses, len(chunk), "losses", float))
            rep.value_steps.extend(_per_edit(res.steps, len(chunk), "steps", int))
        rep.seconds_values += time.perf_counter() - t0
        return torch.cat(Zs), torch.cat(Hs), rep.value_losses[-len(reqs):], rep.value_steps[-len(reqs):]

    def _checked_values(self, reqs: list, layer: int, rep: BatchReport, *, where: str):
        Z, H, losses, steps = self._values(reqs, layer, rep)
        bad = ~(torch.isfinite(Z).all(dim=1) & torch.isfinite(H).all(dim=1))
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise EditError(f"{where}: value optimisation produced a non-finite target for request {row} of the "
                            f"batch (case_id={reqs[row].case_id!r}); no weights were changed by this batch")
        return Z, H, losses, steps

    def _keys(self, reqs: list, layer: int, rep: BatchReport) -> torch.Tensor:
        """K [d, E] in fp64: the keys of ``reqs`` at ``layer`` on the current weights, in chunks."""
        from pmedit.keys import compute_keys

        hp = self.hparams
        t0 = time.perf_counter()
        parts = []
        for chunk in self._chunks(reqs, max(hp.key_batch_size, 256), f"keys L{layer}"):
            k = compute_keys(self.model, self.tokenizer, self.spec, layer, chunk, self._templates,
                             batch_size=hp.key_batch_size)
            if tuple(k.shape) != (len(chunk), self._d):
                raise EditError(f"compute_keys returned {tuple(k.shape)} for {len(chunk)} requests at layer "
                                f"{layer}; expected [{len(chunk)}, {self._d}]")
            parts.append(k.detach().to(device="cpu", dtype=torch.float64))
        K = torch.cat(parts).mT.contiguous()
        rep.seconds_keys += time.perf_counter() - t0
        return K

    def _outputs_at_subject(self, reqs: list, layer: int) -> torch.Tensor:
        """Output of ``layer`` at each subject's last token of the bare prompt, current weights.

        The same position and prompt as value optimisation's h (pmedit.tokens), so that for the
        first layer of a spread this equals h; causal attention makes the target tokens that
        value optimisation appends irrelevant here. Right padding keeps positions from the left.
        """
        from pmedit.hooks import Trace
        from pmedit.tokens import encode_subject_prompt

        name = self.spec.layer_name(layer)
        device = self.spec.down_proj(self.model, layer).weight.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for chunk in self._chunks(reqs, self.hparams.key_batch_size, f"outputs L{layer}"):
            enc = [encode_subject_prompt(self.tokenizer, r, None) for r in chunk]
            n = max(len(e.ids) for e in enc)
            ids = torch.full((len(enc), n), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), n), dtype=torch.long)
            for j, e in enumerate(enc):
                ids[j, :len(e.ids)] = torch.tensor(e.ids)
                mask[j, :len(e.ids)] = 1
            with torch.no_grad(), Trace(self.model, name, retain_output=True, stop=True) as tr:
                tr.run(input_ids=ids.to(device), attention_mask=mask.to(device))
            hidden = tr.outputs[name]
            pos = torch.tensor([e.subject_last for e in enc], device=hidden.device)
            out.append(hidden[torch.arange(len(enc), device=hidden.device), pos].detach().double().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------------ restore
    def restore(self) -> None:
        """Put back the exact original weights and forget every edit (and the edits kept in C)."""
        self._write_all(self._original)
        self._factors = dict(self._base_factors)
        self.n_edits = 0
        self.reports = []

    # -------------------------------------------------------------------- save / load
    def deltas(self) -> dict[int, torch.Tensor]:
        """Current weights minus the originals, exactly: fp64 for fp32 weights, fp32 for 16-bit ones.

        The difference of two floats is exact in a format with twice the mantissa (up to a
        rounding far below the weight's own ulp), so original + delta rounds back to the edited
        weight bit for bit; that is what makes ``load_deltas`` reproduce an edited model exactly.
        """
        out = {}
        with torch.no_grad():
            for layer in self.layers:
                W, W0 = self._weight(layer), self._original[layer]
                acc = _delta_dtype(W.dtype)
                out[layer] = W.detach().to(acc) - W0.to(acc)
        return out

    def save_deltas(self, path: str | os.PathLike) -> Path:
        """Write the edits as safetensors (one delta per module) plus JSON metadata, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        deltas = self.deltas()
        tensors = {f"delta.{self.module_names[layer]}": d.detach().cpu().contiguous() for layer, d in deltas.items()}
        meta = {
            "format": DELTAS_FORMAT,
            "method": self.method,
            "layers": list(self.layers),
            "modules": {
                str(layer): {
                    "name": self.module_names[layer],
                    "shape": list(self._original[layer].shape),
                    "dtype": str(self._original[layer].dtype).removeprefix("torch."),
                    "delta_dtype": str(deltas[layer].dtype).removeprefix("torch."),
                    "base_sha256": _sha256(self._original[layer]),
                }
                for layer in self.layers
            },
            "model_fingerprint": self.spec.fingerprint,
            "model_type": self.spec.model_type,
            "n_edits": self.n_edits,
            "hparams": self.hparams.to_dict(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("saved %d edit(s) on layers %s to %s", self.n_edits, list(self.layers), path)
        return path

    @classmethod
    def load_deltas(cls, model: torch.nn.Module, path: str | os.PathLike, *, tokenizer: Any = None,
                    progress: bool = True) -> Editor:
        """Apply deltas saved by ``save_deltas`` to ``model`` and return the Editor that holds them.

        The model must be the one the deltas were made from, unedited: the fingerprint, every
        module's name, shape and dtype and the SHA-256 of every original matrix are checked
        before anything is written. ``restore()`` on the returned Editor undoes the load.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"deltas file {str(path)!r} does not exist")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            if raw is None:
                raise ValueError(f"{path}: not a pmedit deltas file (no {_META_KEY!r} metadata)")
            meta = json.loads(raw)
            if meta.get("format") != DELTAS_FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, expected {DELTAS_FORMAT!r}")
            hp = EditHparams.from_dict(meta["hparams"], source=f"{path} metadata 'hparams'")
            editor = cls(model, tokenizer, hparams=hp, progress=progress)
            if editor.spec.fingerprint != meta["model_fingerprint"]:
                raise ValueError(
                    f"{path}: saved from a model with fingerprint {meta['model_fingerprint']}, this model has "
                    f"{editor.spec.fingerprint} (another checkpoint or dtype, or already edited)"
                )
            deltas = {}
            for layer in editor.layers:
                m = meta["modules"].get(str(layer))
                if m is None:
                    raise ValueError(f"{path}: metadata lists no module for layer {layer}")
                W0 = editor._original[layer]
                if m["name"] != editor.module_names[layer]:
                    raise ValueError(f"{path}: layer {layer} is module {m['name']!r} there, "
                                     f"{editor.module_names[layer]!r} in this model")
                if list(W0.shape) != m["shape"] or str(W0.dtype).removeprefix("torch.") != m["dtype"]:
                    raise ValueError(f"{path}: {m['name']} was {m['dtype']} {m['shape']}, this model has "
                                     f"{W0.dtype} {list(W0.shape)}")
                if _sha256(W0) != m["base_sha256"]:
                    raise ValueError(f"{path}: {m['name']} differs from the weights the deltas were made "
                                     "from (SHA-256 mismatch): load them into the unedited model")
                t = f.get_tensor(f"delta.{m['name']}")
                if list(t.shape) != m["shape"]:
                    raise ValueError(f"{path}: tensor delta.{m['name']} has shape {list(t.shape)}, "
                                     f"metadata says {m['shape']}")
                deltas[layer] = t
        new = editor._checked_new_weights(deltas, where=f"load_deltas({path})")
        try:
            editor._write_all(new)
        except BaseException:
            editor._write_all(editor._original)
            raise
        editor.n_edits = int(meta.get("n_edits", 0))
        log.info("loaded %d edit(s) on layers %s from %s", editor.n_edits, list(editor.layers), path)
        return editor


# ------------------------------------------------------------------------------ helpers
def _resolve_hparams(hparams, method, layers) -> EditHparams:
    overrides: dict[str, Any] = {}
    if method is not None:
        overrides["method"] = str(method).lower()
    if layers is not None:
        if isinstance(layers, int):
            layers = [layers]
        overrides["layers"] = list(layers)
    if hparams is None:
        if "layers" not in overrides:
            raise ValueError("Editor: give layers=[...] or hparams (an EditHparams or a preset name)")
        return EditHparams.from_dict(overrides, source="Editor arguments")
    if isinstance(hparams, str):
        hp = EditHparams.preset(hparams)
    elif isinstance(hparams, Mapping):
        hp = EditHparams.from_dict(dict(hparams), source="Editor hparams")
    elif isinstance(hparams, EditHparams):
        hp = hparams
    else:
        raise TypeError(f"Editor: hparams must be an EditHparams, a preset name or a mapping, got {type(hparams).__name__}")
    return hp.replace(**overrides) if overrides else hp


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


def _delta_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def _sha256(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
