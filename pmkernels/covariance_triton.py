"""The Triton backend of :mod:`pmkernels.covariance`: acc += xᵀx over upper tile pairs only.

Kernel: a 1-D grid over the T = t(t+1)/2 tile pairs (i, j), i ≤ j, of the d × d output
(t = ⌈d / BLOCK⌉). Each program owns one BLOCK × BLOCK output tile and loops over the whole
token chunk, so no two programs touch the same memory: no atomics, and the summation order is
fixed (deterministic run to run). The padding mask is fused into the loads (a masked row
loads as zeros). bf16/fp16 tiles go straight into ``tl.dot`` with fp32 accumulation; fp32
inputs use ``input_precision="ieee"`` (exact fp32 products) unless the caller allows tf32.

Interpreter quirk: Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the tests) runs
``tl.dot`` on bf16 operands as integer bit patterns, so under the interpreter the tiles are
cast to fp32 in-kernel (constexpr ``CAST_FP32``); products of bf16/fp16 values are exact in
fp32, so results match the GPU path. The interpreter also gets a single autotune config.

Triton is imported lazily (the interpreter flag must be set before any @triton.jit runs).
"""
from __future__ import annotations

import functools

import torch

from pmkernels._triton import interpreting, triton_installed, triton_usable_on


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if not triton_installed():
        return "triton is not installed"
    if triton_usable_on(device):
        return None
    if device.type == "cpu":
        return "Triton runs CPU tensors only through its interpreter (TRITON_INTERPRET=1)"
    if device.type == "cuda":
        return "TRITON_INTERPRET=1 is set: Triton kernels run on CPU tensors only"
    return f"Triton does not run on {device.type} tensors"


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    if interpreting():
        # BLOCK 64 keeps the interpreter's per-program overhead low at d = 1536 (300 programs).
        configs = [triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4)]
    else:
        configs = [
            triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        ]

    # restore_value: the kernel accumulates in place, so autotuning's trial runs must not
    # leave their sums behind.
    @triton.autotune(configs=configs, key=["d", "HAS_MASK", "IEEE"], restore_value=["acc_ptr"])
    @triton.jit
    def syrk_upper_kernel(
        x_ptr, mask_ptr, acc_ptr, n, d, stride_xn, stride_xd, stride_acc,
        HAS_MASK: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """acc[I, J] += Σ_{t < n, mask[t]} x[t, I]ᵀ x[t, J] for the tile pair (I, J) of this program."""
        pid = tl.program_id(0)
        # Column-major enumeration of the upper pairs: pid = j(j+1)/2 + i, 0 ≤ i ≤ j. The fp32
        # square root is exact enough to be off by at most one; the two fix-ups settle it.
        j = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
        j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
        j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
        i = pid - j * (j + 1) // 2

        offs_i = i * BLOCK + tl.arange(0, BLOCK)
        offs_j = j * BLOCK + tl.arange(0, BLOCK)
        in_i = offs_i < d
        in_j = offs_j < d
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            rows = k0 + offs_k
            keep = rows < n
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + rows, mask=keep, other=0) != 0)
            row_off = rows.to(tl.int64)[:, None] * stride_xn
            a = tl.load(x_ptr + row_off + offs_i[None, :] * stride_xd, mask=keep[:, None] & in_i[None, :], other=0.0)
            b = tl.load(x_ptr + row_off + offs_j[None, :] * stride_xd, mask=keep[:, None] & in_j[None, :], other=0.0)
            if CAST_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(a), b, acc)
        c_ptrs = acc_ptr + offs_i.to(tl.int64)[:, None] * stride_acc + offs_j[None, :]
        c_mask = in_i[:, None] & in_j[None, :]
        prev = tl.load(c_ptrs, mask=c_mask, other=0.0)
        tl.store(c_ptrs, prev + acc, mask=c_mask)

    return syrk_upper_kernel


def syrk_update_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                 allow_tf32: bool = False) -> None:
    """acc[d, d] (fp32, contiguous) += Σ_{t: mask[t]} x[t]ᵀ x[t] on the upper tiles (i ≤ j).

    x: [n, d] fp32/fp16/bf16 with any strides, on acc's device; mask: bool [n] or None.
    """
    if acc.dtype != torch.float32 or acc.dim() != 2 or acc.shape[0] != acc.shape[1] or not acc.is_contiguous():
        raise ValueError(f"covariance_triton: acc must be a contiguous float32 square matrix, got {acc.dtype} {tuple(acc.shape)}")
    if x.dim() != 2 or x.shape[1] != acc.shape[0]:
        raise ValueError(f"covariance_triton: x must be [n, {acc.shape[0]}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"covariance_triton: x must be float32/float16/bfloat16, got {x.dtype}")
    if x.device != acc.device or (mask is not None and mask.device != acc.device):
        raise ValueError(f"covariance_triton: x ({x.device}) and mask must be on acc's device ({acc.device})")
    n, d = x.shape
    if n == 0:
        return
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(f"covariance_triton: mask must be bool [{n}], got {mask.dtype} {tuple(mask.shape)}")
        mask_arg = mask.contiguous().view(torch.uint8)
    else:
        mask_arg = acc  # never read: HAS_MASK is a constexpr False
    interp = interpreting()
    cast = interp and x.dtype != torch.float32
    ieee = (x.dtype == torch.float32 and not allow_tf32) or cast

    def grid(meta):
        t = triton_cdiv(d, meta["BLOCK"])
        return (t * (t + 1) // 2,)

    _kernel()[grid](
        x, mask_arg, acc, n, d, x.stride(0), x.stride(1), acc.stride(0),
        HAS_MASK=mask is not None, CAST_FP32=cast, IEEE=ieee,
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
