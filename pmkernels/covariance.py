"""Streaming uncentred second moments S = Σ x xᵀ (and the token count n) for C0 statistics.

Why this exists: every preservation–memorization edit (ROME, MEMIT, EMMET) needs
C0 = E[k kᵀ] of an MLP's input keys over 10⁷–10⁸ tokens. Summing that in fp32, as the reference
code does, drifts once the running sum dwarfs each new batch; summing in fp64 throughout is
slow on GPUs. Here each backend adds bounded chunks (≤ ``chunk_tokens`` ≤ 65536 rows) into an
fp32 accumulator, which is flushed into an fp64 master before it can grow large. Only the
upper triangle (i ≤ j) is computed and stored; ``sum()`` mirrors it.

What it deliberately does not do: centring (C0 is uncentred), tokenisation or model hooks
(pmedit.stats), or any caching on disk (``state_dict`` gives plain tensors for safetensors).

Backends (one module each, same contract, see ``_BACKENDS``): ``torch`` (reference), ``cpu``
(C++/OpenMP over ATen GEMMs), ``triton``, ``cuda``. ``backend="auto"`` picks through
:func:`pmkernels._dispatch.select_backend` (``PMKERNELS_BACKEND`` overrides).

Backend contract: ``unavailable_reason(device) -> str | None`` and
``syrk_update_(acc, x, mask, *, allow_tf32)`` which adds Σ_{t: mask[t]} x[t]ᵀ x[t] into the
upper triangle (diagonal included) of the fp32 [d, d] ``acc``; what it leaves in the strict
lower triangle is unspecified and never read. ``x`` is [n, d] fp32/fp16/bf16 with n ≥ 1 and
arbitrary strides; ``mask`` is None or a bool [n] on the same device.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from pmkernels._dispatch import select_backend

log = logging.getLogger(__name__)

_BACKENDS = {
    "torch": "pmkernels.covariance_torch",
    "cpu": "pmkernels.covariance_cpu",
    "triton": "pmkernels.covariance_triton",
    "cuda": "pmkernels.covariance_cuda",
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHUNK_TOKENS = 65536
# Rows per isfinite() pass: bounds the temporary bool tensor to 16M elements (16 MB) even for
# d = 14336 and 64k-token batches.
_FINITE_CHECK_ELEMS = 1 << 24


def _backend_module(name: str) -> ModuleType:
    return importlib.import_module(_BACKENDS[name])


def _availability(name: str):
    def check(device: torch.device) -> str | None:
        try:
            return _backend_module(name).unavailable_reason(device)
        except ImportError as err:  # a backend file that cannot even import is unavailable
            return f"cannot import {_BACKENDS[name]}: {err}"

    return check


def _gpu_order(device: torch.device) -> tuple[str, ...] | None:
    """Hopper and newer: Triton first (wgmma + TMA loads, see covariance_triton), since the CUDA
    kernel uses Ampere-style mma.sync. Unmeasured until the first GPU run (scripts/gpu_check.sh
    times both); PMKERNELS_BACKEND or backend= choose explicitly."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return ("triton", "cuda", "torch") if torch.cuda.get_device_capability(index)[0] >= 9 else None


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class SecondMoment:
    """Accumulates S = Σ_t x_t x_tᵀ (fp64, d × d) and n = the number of rows added.

    ``update(x, mask)`` takes x of shape [..., dim] (fp32/fp16/bf16, any strides) and an
    optional bool mask of shape x.shape[:-1] (False = padding). Rows holding NaN/Inf raise a
    ValueError giving their count, or with ``on_nonfinite="skip"`` are dropped (not counted;
    ``skipped`` reports how many). ``allow_tf32`` lets GPU backends multiply fp32 inputs in
    tf32 (10-bit mantissa: ~1e-3 relative error per product; off by default).

    ``defer_checks`` (default: on for CUDA accumulators, off elsewhere) makes ``update`` free
    of host synchronisation, so statistics overlap the forward pass: the NaN/Inf screen and
    the kept-row count stay on the device, non-finite rows are masked out on the device, and a
    failure under ``on_nonfinite="raise"`` is reported by the next call that reads results
    (``count``, ``skipped``, ``sum``, ``mean``, ``merge``, ``state_dict``). The failing update
    and every later one are then left out entirely, so the sums equal those before it, as with
    an immediate raise; the error repeats on every read. Without deferral (the CPU default)
    ``update`` itself raises and nothing of that call is applied.
    """

    def __init__(
        self,
        dim: int,
        *,
        device: torch.device | str = "cpu",
        backend: str = "auto",
        chunk_tokens: int = MAX_CHUNK_TOKENS,
        allow_tf32: bool = False,
        on_nonfinite: str = "raise",
        defer_checks: bool | None = None,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"SecondMoment: dim must be a positive int, got {dim!r}")
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
            raise ValueError(
                f"SecondMoment: chunk_tokens must be an int in [1, {MAX_CHUNK_TOKENS}] (the fp32 accumulator's "
                f"bound), got {chunk_tokens!r}"
            )
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"SecondMoment: on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.dim = dim
        self.device = _normalize_device(device)
        self.chunk_tokens = chunk_tokens
        self.allow_tf32 = bool(allow_tf32)
        self.on_nonfinite = on_nonfinite
        if defer_checks is not None and not isinstance(defer_checks, bool):
            raise TypeError(f"SecondMoment: defer_checks must be a bool or None, got {defer_checks!r}")
        self.defer_checks = self.device.type == "cuda" if defer_checks is None else defer_checks
        self.backend = select_backend(
            "covariance", backend, self.device, {name: _availability(name) for name in _BACKENDS},
            gpu_order=_gpu_order(self.device),
        )
        self._impl = _backend_module(self.backend)
        # Upper triangle meaningful; the strict lower triangle is scratch (see module docstring).
        self._master = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        self._acc: torch.Tensor | None = None  # fp32 [d, d], allocated on first update
        self._pending = 0  # rows (kept or masked) added into _acc since the last flush
        self._count = 0
        self._skipped = 0  # rows dropped for NaN/Inf under on_nonfinite="skip"
        self._updates = 0  # update calls with at least one row (named in deferred errors)
        # Deferred-check state (device tensors; None until the first deferred update):
        # [kept rows, skipped rows] and, for the first failing update under "raise",
        # [failed, update number, bad rows, rows, first bad row].
        self._dev_counts: torch.Tensor | None = None
        self._dev_failure: torch.Tensor | None = None
        log.debug("SecondMoment(dim=%d) on %s with backend %s", dim, self.device, self.backend)

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, device={self.device}, backend={self.backend!r}, count={self._count})"

    @property
    def count(self) -> int:
        """Rows accumulated so far (masked-out and skipped rows excluded)."""
        self._resolve()
        return self._count

    @property
    def skipped(self) -> int:
        """Rows dropped for NaN/Inf under ``on_nonfinite="skip"``."""
        self._resolve()
        return self._skipped

    def _resolve(self) -> None:
        """Bring deferred counts to the host (one sync) and raise a deferred NaN/Inf failure."""
        if self._dev_counts is None:
            return
        kept, skipped = (int(v) for v in self._dev_counts.tolist())
        self._count += kept
        self._skipped += skipped
        self._dev_counts.zero_()
        if self._dev_failure is not None:
            failed, call, nbad, rows, first = (int(v) for v in self._dev_failure.tolist())
            if failed:
                raise ValueError(
                    f"SecondMoment.update: {nbad} of {rows} rows hold NaN or Inf (first at flattened row {first}) "
                    f"in update call {call}; checks are deferred on {self.device} (defer_checks=True), so this is "
                    f"reported now. That update and every later one were left out; the sums hold the updates "
                    f"before it. Pass on_nonfinite='skip' to drop such rows instead"
                )

    # ------------------------------------------------------------------ update
    @torch.no_grad()  # statistics, not a graph: activations captured with grad must not chain updates
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> "SecondMoment":
        """Add the rows of x ([..., dim]) where mask ([...], bool) is True; returns self."""
        x2, m = self._validate(x, mask)
        n = x2.shape[0]
        if n == 0:
            return self
        self._updates += 1
        if self.defer_checks:
            return self._update_deferred(x2, m)
        m = self._check_finite(x2, m)
        kept = n if m is None else int(m.sum())
        if kept == 0:
            return self
        if m is not None and kept == n:
            m = None
        if self._acc is None:
            self._acc = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=self.device)
        for start in range(0, n, self.chunk_tokens):
            stop = min(n, start + self.chunk_tokens)
            if self._pending + (stop - start) > self.chunk_tokens:
                self._flush()
            self._impl.syrk_update_(
                self._acc, x2[start:stop], None if m is None else m[start:stop], allow_tf32=self.allow_tf32
            )
            self._pending += stop - start
        self._count += kept
        return self

    def _update_deferred(self, x2: torch.Tensor, m: torch.Tensor | None) -> "SecondMoment":
        # No host sync anywhere below: every decision is a device tensor, and the backend gets
        # the combined keep mask. The row screen is one streaming reduction: a row holding NaN
        # or Inf has a non-finite fp32 sum; a finite row whose sum overflows fp32 has an entry
        # above 3.4e38 / d, whose square would overflow the fp32 accumulator anyway.
        dev = self.device
        if self._dev_counts is None:
            self._dev_counts = torch.zeros(2, dtype=torch.int64, device=dev)
            self._dev_failure = torch.zeros(5, dtype=torch.int64, device=dev)
        n = x2.shape[0]
        ok = torch.isfinite(x2.sum(dim=-1, dtype=torch.float32))
        bad = ~ok if m is None else m & ~ok
        nbad = bad.sum()
        keep = ok if m is None else m & ok
        if self.on_nonfinite == "raise":
            failed_before = self._dev_failure[0] != 0
            first_now = (nbad > 0) & ~failed_before
            info = torch.stack([torch.ones((), dtype=torch.int64, device=dev),
                                torch.full((), self._updates, dtype=torch.int64, device=dev), nbad,
                                torch.full((), n, dtype=torch.int64, device=dev),
                                bad.to(torch.uint8).argmax().to(torch.int64)])
            self._dev_failure.copy_(torch.where(first_now, info, self._dev_failure))
            keep = keep & (self._dev_failure[0] == 0)  # this update failed, or an earlier one did
        else:
            self._dev_counts[1] += nbad
        self._dev_counts[0] += keep.sum()
        if self._acc is None:
            self._acc = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=dev)
        for start in range(0, n, self.chunk_tokens):
            stop = min(n, start + self.chunk_tokens)
            if self._pending + (stop - start) > self.chunk_tokens:
                self._flush()
            self._impl.syrk_update_(self._acc, x2[start:stop], keep[start:stop], allow_tf32=self.allow_tf32)
            self._pending += stop - start
        return self

    def _validate(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SecondMoment.update: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"SecondMoment.update: x has dtype {x.dtype}; supported are float32, float16 and bfloat16 "
                "(cast integer or float64 data explicitly)"
            )
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"SecondMoment.update: x has shape {tuple(x.shape)}; its last dimension must be dim={self.dim}"
            )
        if _normalize_device(x.device) != self.device:
            raise ValueError(
                f"SecondMoment.update: x is on {x.device} but this accumulator (backend {self.backend!r}) "
                f"lives on {self.device}; move x there first"
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"SecondMoment.update: mask must be a bool torch.Tensor, got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"SecondMoment.update: mask has dtype {mask.dtype}; it must be torch.bool")
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"SecondMoment.update: mask has shape {tuple(mask.shape)} but x has shape {tuple(x.shape)}; "
                    f"the mask must be x.shape[:-1] = {tuple(x.shape[:-1])}"
                )
            if _normalize_device(mask.device) != self.device:
                raise ValueError(f"SecondMoment.update: mask is on {mask.device}, x and the accumulator on {self.device}")
            mask = mask.reshape(-1)
        # reshape keeps a strided view where it can; every backend takes arbitrary strides.
        return x.detach().reshape(-1, self.dim), mask

    def _check_finite(self, x2: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor | None:
        # Fast screen: any NaN/Inf makes the fp32 sum non-finite (NaN propagates, Inf - Inf is
        # NaN). One streaming reduction is ~5x cheaper than a per-element isfinite; only a
        # failed screen (or a finite sum overflowing, which the exact pass then clears) pays
        # for the row-wise pass.
        if bool(torch.isfinite(x2.sum(dtype=torch.float32))):
            return m
        rows = max(1, _FINITE_CHECK_ELEMS // self.dim)
        bad_parts = [~torch.isfinite(x2[s : s + rows]).all(dim=-1) for s in range(0, x2.shape[0], rows)]
        bad = bad_parts[0] if len(bad_parts) == 1 else torch.cat(bad_parts)
        if m is not None:
            bad &= m  # padding rows may hold anything: they are never read
        nbad = int(bad.sum())
        if nbad == 0:
            return m
        if self.on_nonfinite == "raise":
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"SecondMoment.update: {nbad} of {x2.shape[0]} rows hold NaN or Inf (first at flattened row "
                f"{first}); pass on_nonfinite='skip' to drop such rows"
            )
        self._skipped += nbad
        log.debug("SecondMoment: skipping %d non-finite rows", nbad)
        return ~bad if m is None else m & ~bad

    def _flush(self) -> None:
        if self._acc is not None and self._pending:
            self._master.add_(self._acc)
            self._acc.zero_()
        self._pending = 0

    # ------------------------------------------------------------------ results
    def _upper(self) -> torch.Tensor:
        """Master plus the pending fp32 chunk, without flushing: reading never changes rounding."""
        self._resolve()
        s = self._master.clone() if self._acc is None or not self._pending else self._master + self._acc
        return s.triu_()

    def sum(self) -> torch.Tensor:
        """S = Σ x xᵀ: the full symmetric fp64 [dim, dim] matrix (a new tensor)."""
        u = self._upper()
        return u + u.triu(1).T

    def mean(self) -> torch.Tensor:
        """S / n in fp64 (the uncentred second moment C0)."""
        if self.count == 0:
            raise ValueError("SecondMoment.mean: no rows accumulated yet (count == 0)")
        return self.sum().div_(self._count)

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add another accumulator's sum and count into this one (e.g. from another shard)."""
        if not isinstance(other, SecondMoment):
            raise TypeError(f"SecondMoment.merge: expected a SecondMoment, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"SecondMoment.merge: dims differ ({self.dim} vs {other.dim})")
        if other.device != self.device:
            raise ValueError(f"SecondMoment.merge: devices differ ({self.device} vs {other.device})")
        if other is self:
            raise ValueError("SecondMoment.merge: cannot merge an accumulator into itself")
        self._resolve()
        self._master.add_(other._upper())  # resolves other's deferred counts (or raises) first
        self._count += other._count
        self._skipped += other._skipped
        return self

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"sum": fp64 [dim, dim] full symmetric S, "count": int64 scalar}, on the CPU.

        Plain contiguous tensors, so ``safetensors.torch.save_file`` takes them as they are.
        """
        total = self.sum()  # resolves deferred counts (or raises) first
        return {
            "sum": total.cpu().contiguous(),
            "count": torch.tensor(self._count, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "SecondMoment":
        """Replace this accumulator's contents with ``state`` (as written by ``state_dict``).

        The sum must be fp64 [dim, dim] and symmetric up to rounding (max |S − Sᵀ| ≤ 1e-12·max|S|,
        room for a sum produced by another tool); its upper triangle is kept.
        """
        if not isinstance(state, dict):
            raise TypeError(f"SecondMoment.load_state_dict: expected a dict, got {type(state).__name__}")
        missing = {"sum", "count"} - set(state)
        extra = set(state) - {"sum", "count"}
        if missing or extra:
            raise ValueError(
                f"SecondMoment.load_state_dict: keys must be exactly ['count', 'sum']; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        s, c = state["sum"], state["count"]
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float64 or tuple(s.shape) != (self.dim, self.dim):
            desc = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(
                f"SecondMoment.load_state_dict: 'sum' must be a float64 tensor of shape ({self.dim}, {self.dim}), "
                f"got {desc}"
            )
        if not isinstance(c, torch.Tensor) or c.dtype != torch.int64 or c.numel() != 1:
            desc = f"{c.dtype} {tuple(c.shape)}" if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"SecondMoment.load_state_dict: 'count' must be a one-element int64 tensor, got {desc}")
        count = int(c.reshape(()).item())
        if count < 0:
            raise ValueError(f"SecondMoment.load_state_dict: 'count' is negative ({count})")
        if not bool(torch.isfinite(s).all()):
            raise ValueError("SecondMoment.load_state_dict: 'sum' holds NaN or Inf")
        asym = float((s - s.T).abs().max()) if self.dim > 1 else 0.0
        scale = float(s.abs().max()) if s.numel() else 0.0
        if asym > 1e-12 * scale:
            raise ValueError(
                f"SecondMoment.load_state_dict: 'sum' is not symmetric (max |S - S^T| = {asym:.3g}, max |S| = {scale:.3g})"
            )
        self._master = s.to(device=self.device, dtype=torch.float64).triu().contiguous()
        if self._acc is not None:
            self._acc.zero_()
        self._pending = 0
        self._count = count
        self._skipped = 0
        self._dev_counts = self._dev_failure = None  # a reload replaces any deferred state
        return self
