"""The C++/OpenMP backend of :mod:`pmkernels.covariance` (csrc/covariance_cpu.cpp).

Half the flops of ``xᵀx``: one ATen/MKL GEMM per block row of the upper triangle. JIT-built on
first use through :func:`pmkernels._build.load_extension`; when it cannot be built,
``unavailable_reason`` says so and ``backend="auto"`` falls back to the torch reference.
``PMKERNELS_COV_BLOCK`` overrides the block-row height (256: see the .cpp for why).
"""
from __future__ import annotations

import os

import torch

from pmkernels._build import load_extension

_EXT_NAME = "pmkernels_covariance_cpu"


def _ext():
    return load_extension(_EXT_NAME, ["covariance_cpu.cpp"])


def _block() -> int:
    raw = os.environ.get("PMKERNELS_COV_BLOCK", "256")
    try:
        block = int(raw)
    except ValueError:
        raise ValueError(f"PMKERNELS_COV_BLOCK={raw!r} is not an integer") from None
    if block < 1:
        raise ValueError(f"PMKERNELS_COV_BLOCK={raw!r} must be positive")
    return block


def unavailable_reason(device: torch.device) -> str | None:
    if torch.device(device).type != "cpu":
        return f"the C++ backend runs on CPU tensors only, not {device}"
    if _ext() is None:
        return f"the C++ extension {_EXT_NAME!r} could not be built (see the warning above)"
    return None


def syrk_update_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                 allow_tf32: bool = False) -> None:
    """acc[d, d] (fp32) += Σ_{t: mask[t]} x[t]ᵀ x[t], upper triangle only (allow_tf32: no effect on CPU)."""
    ext = _ext()
    if ext is None:
        raise RuntimeError(f"pmkernels: the C++ extension {_EXT_NAME!r} is unavailable")
    ext.syrk_update(acc, x, mask, _block())
