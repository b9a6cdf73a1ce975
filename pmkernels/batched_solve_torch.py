"""Reference backend for ``batched_spd_solve``: torch's batched ``cholesky_ex`` + ``cholesky_solve``."""
from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return None


def factor_solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X = A⁻¹B per matrix and info (int32 [b]: 0, or the 1-based pivot where Cholesky failed).

    Rows of X for failed matrices are unspecified; the caller masks them.
    """
    L, info = torch.linalg.cholesky_ex(A)
    return torch.cholesky_solve(B, L), info.to(torch.int32)
