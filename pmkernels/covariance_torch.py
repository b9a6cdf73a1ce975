"""The readable reference backend of :mod:`pmkernels.covariance`: plain torch, any device.

One chunk of tokens is added into an fp32 accumulator as ``acc += xᵀx`` over the kept rows.
It computes the full product (twice the flops the other backends spend); the accumulator
contract only asks for the upper triangle, so this stays interchangeable with them.
"""
from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return None  # plain torch runs wherever tensors live


def syrk_update_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                 allow_tf32: bool = False) -> None:
    """acc[d, d] (fp32) += Σ_{t: mask[t]} x[t]ᵀ x[t] for x[n, d] (fp32/fp16/bf16, any strides).

    Products of bf16/fp16 values are exact in fp32, so upcasting first loses nothing against
    a tensor-core kernel that multiplies the narrow values and accumulates in fp32.
    """
    if mask is not None:
        x = x[mask]
    if x.shape[0] == 0:
        return
    xf = x.to(torch.float32)
    if xf.is_cuda:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
        try:
            acc.addmm_(xf.T, xf)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    else:
        acc.addmm_(xf.T, xf)
