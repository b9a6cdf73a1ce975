"""The CUDA backend of :mod:`pmkernels.covariance` (csrc/covariance_cuda.{cu,cpp,h}).

Tensor cores (WMMA ``mma.sync``, fp32 accumulation) over the upper tile pairs only, one thread
block per 128 × 128 output tile and token range: no atomics, deterministic. bf16/fp16 run on
tensor cores; fp32 runs as tf32 on tensor cores only when ``allow_tf32``, else in an exact fp32
SIMT kernel. When the tiles alone cannot fill the GPU (small d) the tokens are split over
blocks into zeroed fp32 partials, summed in a fixed order (same rule as the Triton backend,
:func:`pmkernels.covariance_triton.split_count`). On Hopper the Triton backend (wgmma + TMA)
is expected to be faster for 16-bit input; the GPU check (scripts/gpu_check.sh) times both.
JIT-built with nvcc on first use (needs a CUDA torch and a GPU); otherwise unavailable, and
``backend="auto"`` takes Triton or torch instead.
"""
from __future__ import annotations

import torch

from pmkernels._build import load_extension

_EXT_NAME = "pmkernels_covariance_cuda"


def _ext():
    return load_extension(_EXT_NAME, ["covariance_cuda.cpp", "covariance_cuda.cu"], cuda=True)


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend takes CUDA tensors only, not {device.type}"
    if torch.version.cuda is None or not torch.cuda.is_available():
        return "no CUDA torch or no visible GPU"
    if _ext() is None:
        return f"the CUDA extension {_EXT_NAME!r} could not be built (see the warning above)"
    return None


def syrk_update_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                 allow_tf32: bool = False) -> None:
    """acc[d, d] (fp32, contiguous) += Σ_{t: mask[t]} x[t]ᵀ x[t] on the upper tiles (i ≤ j).

    Strided x is copied to a contiguous buffer first: the kernel's vector loads need unit
    column stride (a chunk of ≤ 64k rows bounds the copy).
    """
    from pmkernels.covariance_triton import split_count

    ext = _ext()
    if ext is None:
        raise RuntimeError(f"pmkernels: the CUDA extension {_EXT_NAME!r} is unavailable")
    n, d = x.shape
    exact = x.dtype == torch.float32 and not allow_tf32
    tile, grain = (64, 16) if exact else (128, 32)  # STILE/SBK and TILE/BK in csrc/covariance_cuda.cu
    t = -(-d // tile)
    rows, ws = 0, None
    split = split_count(t * (t + 1) // 2, n, acc.device) if n else 1
    if split > 1:
        rows = -(-(-(-n // split)) // grain) * grain
        ws = torch.zeros(-(-n // rows), d, d, dtype=torch.float32, device=acc.device)
    ext.syrk_update(acc, x.contiguous(), None if mask is None else mask.contiguous(), bool(allow_tf32), rows, ws)
