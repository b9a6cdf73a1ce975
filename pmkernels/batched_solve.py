"""Many small SPD solves at once: X_i = A_i⁻¹B_i for A [b, n, n], B [b, n, m] (n up to 256).

Why this exists: sequential-batched EMMET with one edited layer can form every batch's
D_b = K_bᵀC⁻¹K_b up front (the layer's keys do not depend on its own down_proj) and needs them
all factored and solved; a Python loop of ``torch.linalg.cholesky`` pays per-call overhead
that dwarfs the n³/3 flops of a 64×64 factorization.

Backends (one module each, same contract): ``torch`` (batched ``cholesky_ex`` +
``cholesky_solve``, the reference), ``cpu`` (C++/OpenMP, one thread per matrix), ``triton``
(one program per matrix, register-resident up to n = 64, blocked through a workspace above)
and ``cuda`` (one thread block per matrix, shared memory). Contract:
``unavailable_reason(device) -> str | None`` and ``factor_solve(A, B) -> (X, info)`` with info
int32 [b]: 0, or the 1-based pivot at which Cholesky met a non-positive value.

Jitter is handled here, once, for every backend: matrices whose factorization fails are
retried alone with ε·mean(diag A_i)·10ᵗ added to their diagonal (t = 0, 1, ... up to
``max_retries - 1``); the jitter each one needed is returned. Inputs are never modified.

What it deliberately does not do: large single systems (``pmkernels.solve.SPDFactor``).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType

import torch

from pmkernels._dispatch import select_backend
from pmkernels.spd import NotSPDError, _lambda_min_bound

log = logging.getLogger(__name__)

__all__ = ["batched_spd_solve", "BatchedSolve", "MAX_N_COMPILED"]

_BACKENDS = {
    "torch": "pmkernels.batched_solve_torch",
    "cpu": "pmkernels.batched_solve_cpu",
    "triton": "pmkernels.batched_solve_triton",
    "cuda": "pmkernels.batched_solve_cuda",
}
# The compiled GPU kernels keep one matrix per program/block; past this size a matrix no
# longer fits the design (and one matrix has enough work for the ordinary dense path).
MAX_N_COMPILED = 256
_DEFAULT_EPS = {torch.float64: 1e-14, torch.float32: 1e-7}


@dataclass
class BatchedSolve:
    """``X`` [b, n, m] (NaN for matrices that failed, with ``check=False``), ``info`` int32 [b]
    (0, or the 1-based failing pivot after the whole jitter budget) and ``jitter`` [b] (the
    absolute diagonal jitter each matrix needed, 0 for most)."""

    X: torch.Tensor
    info: torch.Tensor
    jitter: torch.Tensor
    backend: str = "torch"


def _backend_module(name: str) -> ModuleType:
    return importlib.import_module(_BACKENDS[name])


def _availability(name: str, n: int):
    def check(device: torch.device) -> str | None:
        if name in ("triton", "cuda") and n > MAX_N_COMPILED:
            return f"n={n} > {MAX_N_COMPILED}, the largest matrix one program/block holds"
        try:
            return _backend_module(name).unavailable_reason(device)
        except ImportError as err:
            return f"cannot import {_BACKENDS[name]}: {err}"

    return check


def _validate_shapes(A: torch.Tensor, B: torch.Tensor) -> None:
    for nm, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"batched_spd_solve: {nm} must be a torch.Tensor, got {type(t).__name__}")
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"batched_spd_solve: A must be [b, n, n] (a batch of square matrices), got {tuple(A.shape)}")
    b, n = A.shape[0], A.shape[1]
    if B.ndim != 3 or B.shape[0] != b or B.shape[1] != n:
        raise ValueError(f"batched_spd_solve: B must be [b={b}, n={n}, m] to match A {tuple(A.shape)}, got {tuple(B.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"batched_spd_solve: A must be float32 or float64, got {A.dtype}")
    if B.dtype != A.dtype:
        raise ValueError(f"batched_spd_solve: B is {B.dtype} but A is {A.dtype}")
    if B.device != A.device:
        raise ValueError(f"batched_spd_solve: B is on {B.device} but A is on {A.device}")


def _validate_values(A: torch.Tensor, B: torch.Tensor, stats: torch.Tensor | None) -> None:
    """NaN/Inf anywhere, or a matrix whose two triangles disagree, is an error naming it.

    ``stats`` [b, 3] = (max|a_ij − a_ji|, max|a_ij|, non-finite count), plus a fourth column
    counting B's non-finite entries, when the C++ backend gathered them during its copy-in;
    otherwise they are computed here in torch.
    """
    # A finite sum proves every entry finite (NaN/Inf propagate); only a non-finite sum pays
    # for the scan that locates the culprit.
    if stats is not None and stats.shape[1] == 4:
        _check_finite("B", B, not bool(stats[:, 3].any()))
    else:
        _check_finite("B", B, bool(torch.isfinite(B.sum())) if B.numel() else True)
    if A.numel() == 0:
        return
    if stats is not None:
        asym, scale, nonfinite = stats[:, :3].unbind(1)
        _check_finite("A", A, not bool(nonfinite.any()))
    else:
        _check_finite("A", A, bool(torch.isfinite(A.sum())))
        scale = A.abs().amax(dim=(1, 2)).double()
        asym = (A - A.mT).abs().amax(dim=(1, 2)).double()
    # Every backend reads one triangle; refuse matrices whose two triangles disagree.
    tol = torch.finfo(A.dtype).eps ** 0.5 * scale
    bad = (asym > tol).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"batched_spd_solve: {bad.numel()} matrices are not symmetric; matrix {i}: "
                         f"max|A-Aᵀ| = {asym[i].item():.3g} > {tol[i].item():.3g} (sqrt(eps) x max|A|)")


def _check_finite(nm: str, t: torch.Tensor, ok: bool) -> None:
    if ok:
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = tuple(int(v) for v in bad.nonzero()[0].tolist())
        raise ValueError(f"batched_spd_solve: {nm} has {int(bad.sum())} non-finite entries; first in matrix "
                         f"{idx[0]} at [{idx[1]}, {idx[2]}] = {t[idx].item()}")


def _cpu_stats(A: torch.Tensor) -> torch.Tensor | None:
    """The same statistics from one C++ pass, for CPU tensors going to a non-C++ backend."""
    if A.device.type != "cpu" or A.numel() == 0:
        return None
    from pmkernels import batched_solve_cpu

    if batched_solve_cpu.unavailable_reason(A.device) is not None:
        return None
    return batched_solve_cpu.check_stats(A.contiguous())


def batched_spd_solve(
    A: torch.Tensor,
    B: torch.Tensor,
    backend: str = "auto",
    *,
    eps: float | None = None,
    max_retries: int = 6,
    check: bool = True,
) -> BatchedSolve:
    """Solve A_i X_i = B_i for every i by Cholesky, escalating jitter per matrix.

    ``B`` may be [b, n] (one right-hand side each; X is then [b, n]). With ``check=True`` a
    matrix that stays non-SPD through the jitter budget raises ``NotSPDError`` naming it and
    bounding its smallest eigenvalue; with ``check=False`` its X is NaN and its info nonzero.
    """
    vec = isinstance(B, torch.Tensor) and isinstance(A, torch.Tensor) and B.ndim == 2 and A.ndim == 3
    if vec:
        B = B.unsqueeze(-1)
    _validate_shapes(A, B)
    if max_retries < 0:
        raise ValueError(f"batched_spd_solve: max_retries must be >= 0, got {max_retries}")
    b, n, m = B.shape
    name = select_backend("batched_spd_solve", backend, A.device, {k: _availability(k, n) for k in _BACKENDS})
    mod = _backend_module(name)
    eps = _DEFAULT_EPS[A.dtype] if eps is None else float(eps)
    A = A.contiguous()
    B = B.contiguous()
    jitter = torch.zeros(b, dtype=A.dtype, device=A.device)
    if b == 0 or n == 0:
        _validate_values(A, B, None)
        X = torch.empty_like(B)
        info = torch.zeros(b, dtype=torch.int32, device=A.device)
        return BatchedSolve(X.squeeze(-1) if vec else X, info, jitter, name)

    if name == "cpu":
        # The check rides along the factorization's copy-in; results are only used after it passes.
        X, info, stats = mod.factor_solve_checked(A, B)
        _validate_values(A, B, stats)
    else:
        _validate_values(A, B, _cpu_stats(A))
        X, info = mod.factor_solve(A, B)
    failed = (info != 0).nonzero().flatten()
    first_info = info.clone()
    if failed.numel():
        mean_diag = A.diagonal(dim1=1, dim2=2).mean(dim=1)
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        todo = failed
        for t in range(max_retries):
            if todo.numel() == 0:
                break
            jit = eps * mean_diag[todo].clamp_min(0) * 10.0**t
            Xt, it = mod.factor_solve((A[todo] + jit[:, None, None] * eye).contiguous(), B[todo].contiguous())
            ok = it == 0
            done = todo[ok]
            X[done] = Xt[ok]
            info[done] = 0
            jitter[done] = jit[ok]
            todo = todo[~ok]
        if failed.numel() > todo.numel():
            log.info("batched_spd_solve: %d of %d matrices needed jitter (max %.3g)",
                     failed.numel() - todo.numel(), b, float(jitter.max()))
        if todo.numel():
            info[todo] = first_info[todo]
            X[todo] = float("nan")
            if check:
                i = int(todo[0])
                k = int(first_info[i])
                raise NotSPDError(
                    f"batched_spd_solve: {todo.numel()} of {b} matrices are not positive definite even with jitter "
                    f"up to {eps * 10.0 ** max(max_retries - 1, 0):.1e} x mean(diag); first: matrix {i} (Cholesky "
                    f"failed at pivot {k}), λ_min <= {_lambda_min_bound(A[i], k):.3g}; indices "
                    f"{todo[:10].tolist()}{' ...' if todo.numel() > 10 else ''}"
                )
    return BatchedSolve(X.squeeze(-1) if vec else X, info, jitter, name)
