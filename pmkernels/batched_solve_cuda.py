"""CUDA backend for ``batched_spd_solve``: one thread block per matrix (csrc/batched_solve_cuda.cu).

The matrix is factored in dynamic shared memory when n²·sizeof fits the device's opt-in limit
(fp64 up to n ≈ 165 on Hopper, fp32 up to n ≈ 235) and in a global workspace otherwise; the
solves run in place in X with the block's threads over rows × right-hand sides. Why a block per
matrix: at n ≤ 256 a single factorization cannot fill a GPU, but a thousand of them can, and
keeping each inside one block needs no grid-wide synchronisation between Cholesky steps.
"""
from __future__ import annotations

import torch

from pmkernels._build import load_extension

_NAME = "pmkernels_batched_solve_cuda"


def _ext():
    return load_extension(_NAME, ["batched_solve_cuda.cpp", "batched_solve_cuda.cu"], cuda=True)


def unavailable_reason(device: torch.device) -> str | None:
    if torch.device(device).type != "cuda":
        return "the cuda backend takes CUDA tensors only"
    return None if _ext() is not None else "the CUDA extension could not be built (see the warning)"


def factor_solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    X, info = _ext().factor_solve(A.contiguous(), B.contiguous())
    return X, info
