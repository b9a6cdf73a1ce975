"""Triton backend for ``batched_spd_solve``: one program per matrix, right-looking Cholesky.

Up to n = 64 the whole (padded, power-of-two) matrix is one register tile: it is loaded once,
factored column by column with rank-1 updates of the tile, and only L goes back to memory.
Above that (n ≤ 256) the matrix is split into 32×32 blocks in a per-matrix workspace and
factored blocked right-looking: each diagonal block in registers as above, the panel below it
by one ``tl.dot`` with the inverse of the diagonal factor, then the trailing blocks by
``tl.dot`` rank-32 updates. The inverse diagonal factors are kept, so both triangular solves
are ``tl.dot``s too (the usual GPU trsm trick; the blocks are small, so the extra rounding is
bounded by the diagonal blocks' own conditioning).

Padding is an identity block on the diagonal (and zero right-hand sides), which changes
neither the factor nor the solution of the leading n×n system. A non-positive pivot records
its 1-based index in ``info`` (the first one per matrix); the host retries with jitter.

Fp32 ``tl.dot`` is pinned to ``input_precision="ieee"``, and fp32 square roots and divisions are
the correctly rounded ``sqrt_rn`` / ``div_rn``: tf32 would cost three decimal digits in L, the
approximate instructions up to 2 ulp per pivot, which the jitter logic would then misread as a
conditioning problem.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from pmkernels._triton import triton_usable_on

_MAX_REGISTER_N = 64  # one tile; above this, blocks of _BLOCK
_BLOCK = 32


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if triton_usable_on(device):
        return None
    if device.type == "cpu":
        return "Triton runs on CPU tensors only through its interpreter (set TRITON_INTERPRET=1 before import)"
    return "Triton is not installed or cannot run on this device"


@functools.lru_cache(maxsize=None)
def _kernel():
    from pmkernels._batched_solve_triton_kernels import _batched_chol_solve

    return _batched_chol_solve


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def launch_params(n: int, m: int) -> dict:
    """Tile sizes and warps for an n×n system with m right-hand sides (also read by the
    resource report in scripts/gpu_check.py). PMKERNELS_TRITON_SOLVE_WARPS overrides the warps
    (the GPU check times 2, 4 and 8 at n = 64: the register tile is latency-bound there)."""
    if n <= _MAX_REGISTER_N:
        BS = max(16, _next_pow2(n))  # tl.dot needs every dimension ≥ 16
        NB = 1
    else:
        BS = _BLOCK
        NB = -(-n // BS)
    BM = 16 if m <= 16 else 32
    MP = max(BM, -(-m // BM) * BM)
    warps = 4 if BS <= 32 else 8
    env = os.environ.get("PMKERNELS_TRITON_SOLVE_WARPS")
    if env:
        if env not in ("1", "2", "4", "8", "16"):
            raise ValueError(f"PMKERNELS_TRITON_SOLVE_WARPS={env!r}: expected 1, 2, 4, 8 or 16")
        warps = int(env)
    return dict(BS=BS, NB=NB, NP=BS * NB, BM=BM, MP=MP, NCH=MP // BM, num_warps=warps)


def factor_solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, _ = A.shape
    m = B.shape[2]
    p = launch_params(n, m)
    BS, NB, NP, BM, MP = p["BS"], p["NB"], p["NP"], p["BM"], p["MP"]
    W = torch.zeros(b, NP, NP, dtype=A.dtype, device=A.device)
    W[:, :n, :n] = A
    if NP > n:
        W.diagonal(dim1=1, dim2=2)[:, n:] = 1
    X = torch.zeros(b, NP, MP, dtype=A.dtype, device=A.device)
    X[:, :n, :m] = B
    T = torch.empty(b, NB, BS, BS, dtype=A.dtype, device=A.device)
    info = torch.zeros(b, dtype=torch.int32, device=A.device)
    if b:
        # Triton launches on the current device: with tensors on cuda:1+ it must be theirs.
        with torch.cuda.device(A.device) if A.device.type == "cuda" else contextlib.nullcontext():
            _kernel()[(b,)](W, T, X, info, NP=NP, MP=MP, BS=BS, NB=NB, BM=BM, NCH=p["NCH"],
                            num_warps=p["num_warps"])
    return X[:, :n, :m].contiguous(), info
