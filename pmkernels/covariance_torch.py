"""The readable reference backend of :mod:`pmkernels.covariance`: plain torch, any device.

One chunk of tokens is added into an fp32 accumulator as ``acc += xᵀx`` over the kept rows.
It computes the full product (twice the flops the other backends spend); the accumulator
contract only asks for the upper triangle, so this stays interchangeable with them.

TF32 without touching global state: torch's TF32 switch is process-wide (toggling it around a
call races with other threads, and reading it can raise when old and new APIs were mixed), so
this module never reads or writes it. 16-bit inputs are exact under TF32 anyway (bf16/fp16
values fit TF32's 10-bit mantissa, so every product is exact); fp32 inputs on CUDA without
``allow_tf32`` are multiplied in fp64 (never TF32; about the cost of exact fp32 on Hopper,
whose fp64 tensor-core rate matches its fp32 SIMT rate), in row blocks to bound memory.
"""
from __future__ import annotations

import torch


_FP64_BLOCK_ELEMS = 1 << 27  # 1 GiB of fp64 rows at a time


def unavailable_reason(device: torch.device) -> str | None:
    return None  # plain torch runs wherever tensors live


def syrk_update_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                 allow_tf32: bool = False) -> None:
    """acc[d, d] (fp32) += Σ_{t: mask[t]} x[t]ᵀ x[t] for x[n, d] (fp32/fp16/bf16, any strides).

    Products of bf16/fp16 values are exact in fp32, so upcasting first loses nothing against
    a tensor-core kernel that multiplies the narrow values and accumulates in fp32.
    """
    if mask is not None:
        # On CUDA a boolean gather would synchronise (its size is data-dependent); a select keeps
        # the shape, and padding rows (which may hold NaN) become exact zeros.
        x = torch.where(mask[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device)) if x.is_cuda else x[mask]
    if x.shape[0] == 0:
        return
    if x.is_cuda and x.dtype == torch.float32 and not allow_tf32:
        rows = max(1, _FP64_BLOCK_ELEMS // x.shape[1])
        part = None
        for s in range(0, x.shape[0], rows):
            xd = x[s : s + rows].double()
            part = xd.T @ xd if part is None else part.addmm_(xd.T, xd)
        acc.add_(part)
        return
    xf = x.to(torch.float32)
    acc.addmm_(xf.T, xf)
