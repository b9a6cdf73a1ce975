"""The Triton backend of :mod:`pmkernels.covariance`: acc += xᵀx over upper tile pairs only.

Kernel: a grid over the T = t(t+1)/2 tile pairs (i, j), i ≤ j, of the d × d output
(t = ⌈d / BLOCK⌉) times S token ranges. Each program owns one BLOCK × BLOCK output tile of one
token range: no atomics, and the summation order is fixed (deterministic run to run). S = 1
(the program adds straight into acc) unless the tiles alone cannot fill the GPU (small d);
then each range stores an fp32 partial and the partials are summed in a fixed order
(:func:`split_count`). The padding mask is fused into the loads (a masked row loads as zeros).
bf16/fp16 tiles go straight into ``tl.dot`` with fp32 accumulation (wgmma on Hopper); fp32
inputs use ``input_precision="ieee"`` (exact fp32 products, FMA: there is no tensor-core
instruction for them) unless the caller allows tf32.

Under Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by the tests) the same kernel and
configs run; :func:`pmkernels._triton.fix_interpreter_bf16_dot` makes the interpreter's bf16
``tl.dot`` compute with numbers rather than bit patterns, so the bf16 path is the one tested.

Triton is imported lazily (the interpreter flag must be set before any @triton.jit runs).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch

from pmkernels._triton import fix_interpreter_bf16_dot, interpreting, triton_installed, triton_usable_on


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


class Config(NamedTuple):
    BLOCK: int
    BLOCK_K: int
    num_warps: int
    num_stages: int

    @property
    def kwargs(self) -> dict:
        return {"BLOCK": self.BLOCK, "BLOCK_K": self.BLOCK_K}


# One config per input class, chosen from compile-only resource reports for sm_90a and sm_80
# (scripts/gpu_check.py resources; benchmarks/RESULTS.md "GPU readiness"): no spills, shared
# memory under the 227 KiB Hopper opt-in limit, wgmma on sm_90a for 16-bit and tf32 input.
# A fixed choice instead of @triton.autotune: the kernel accumulates in place (autotune trials
# would need restore_value copies of a 0.8 GB accumulator at d = 14336), a short tail chunk must
# not fix the config for the run, and the split over tokens depends on the tile size.
# PMKERNELS_TRITON_COV_CONFIG="BLOCK,BLOCK_K,warps,stages" overrides (the GPU check sweeps these).
_CONFIGS = {
    "16bit": Config(128, 64, 8, 3),
    "tf32": Config(128, 32, 8, 3),
    "ieee": Config(128, 32, 8, 3),
    # no TMA (rows not 16-byte aligned, strided columns, or before Hopper): per-element pointers;
    # the largest such config without spills on sm_90a and sm_80
    "pointer": Config(64, 32, 4, 3),
}
# Candidates the GPU check times against each other (the first run records the winner).
_SWEEP = [Config(128, 64, 8, 3), Config(128, 64, 8, 4), Config(128, 128, 8, 3), Config(128, 32, 8, 4),
          Config(64, 64, 4, 4)]
# Split the tokens over blocks until there are ~2 programs per SM, each with at least this many rows.
_MIN_ROWS_PER_SPLIT = 1024
_MAX_SPLIT = 32


def gpu_configs() -> list[Config]:
    """Every config the resource report and the GPU check's sweep look at."""
    out = list(dict.fromkeys([*_CONFIGS.values(), *_SWEEP]))
    return out


def _tma_ok(x: torch.Tensor) -> bool:
    """Whether x can be read through a TMA tensor descriptor: unit column stride, 16-byte
    aligned base and row stride (bf16 rows of d % 8 == 0 elements, fp32 of d % 4 == 0)."""
    if os.environ.get("PMKERNELS_TRITON_COV_TMA", "1") == "0":
        return False
    if x.device.type == "cuda" and _capability(x.device)[0] < 9:
        return False  # before Hopper, Triton lowers descriptors to plain loads, and they spill
    es = x.element_size()
    return x.stride(1) == 1 and x.data_ptr() % 16 == 0 and (x.stride(0) * es) % 16 == 0 \
        and x.shape[0] > 0


def _config_for(kind: str) -> Config:
    raw = os.environ.get("PMKERNELS_TRITON_COV_CONFIG", "").strip()
    if not raw:
        return _CONFIGS[kind]
    try:
        vals = [int(v) for v in raw.split(",")]
        cfg = Config(*vals)
    except (TypeError, ValueError):
        raise ValueError(f"PMKERNELS_TRITON_COV_CONFIG={raw!r}: expected four ints 'BLOCK,BLOCK_K,warps,stages'") from None
    if cfg.BLOCK not in (16, 32, 64, 128, 256) or cfg.BLOCK_K not in (16, 32, 64, 128):
        raise ValueError(f"PMKERNELS_TRITON_COV_CONFIG={raw!r}: BLOCK in 16..256 and BLOCK_K in 16..128, powers of two")
    return cfg


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(pairs: int, n: int, device: torch.device, *, min_rows: int = _MIN_ROWS_PER_SPLIT) -> int:
    """How many token ranges to split the chunk into so that small d still fills the GPU.

    d = 1536 at BLOCK 128 gives 78 output tiles on 132 SMs, d = 576 gives 15: without a split
    most SMs idle. Each split sums its rows into its own fp32 partial, reduced in a fixed order.
    """
    env = os.environ.get("PMKERNELS_TRITON_COV_SPLIT")
    if env:
        try:
            forced = int(env)
        except ValueError:
            raise ValueError(f"PMKERNELS_TRITON_COV_SPLIT={env!r} is not an int") from None
        if forced < 1:
            raise ValueError(f"PMKERNELS_TRITON_COV_SPLIT={env!r} must be >= 1")
        return max(1, min(forced, n))
    if device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if pairs >= target:
        return 1
    return max(1, min(_MAX_SPLIT, -(-target // pairs), n // min_rows))


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    # n and the split sizes change from call to call: no recompiles for their divisibility by 16.
    @triton.jit(do_not_specialize=["n", "rows_per_split", "split_stride"])
    def syrk_upper_kernel(
        x_ptr, mask_ptr, acc_ptr, n, d, stride_xn, stride_xd, stride_acc, rows_per_split, split_stride,
        HAS_MASK: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr, DESC: tl.constexpr, ACC_DESC: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """acc[I, J] += Σ_{t in this split, mask[t]} x[t, I]ᵀ x[t, J] for the tile pair (I, J) of this program.

        With SPLIT, program (pid, s) sums rows [s·R, (s+1)·R) and *stores* its partial tile at
        acc_ptr + s·split_stride (a [S, d, d] fp32 workspace); without, it adds into acc.
        With DESC, x_ptr is a host-made TensorDescriptor ([BLOCK_K, BLOCK] boxes): TMA loads on
        Hopper, no per-element addresses in registers, out-of-range rows/columns read as zero.
        With ACC_DESC, acc_ptr is a [BLOCK, BLOCK] descriptor of acc: the read-add-write epilogue
        goes through TMA too (with per-element pointers it alone took a 128 x 128 tile from 90
        to 255 registers and spills).
        """
        pid = tl.program_id(0)
        s = tl.program_id(1)
        # Column-major enumeration of the upper pairs: pid = j(j+1)/2 + i, 0 ≤ i ≤ j. The fp32
        # square root is exact enough to be off by at most one; the two fix-ups settle it.
        j = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
        j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
        j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
        i = pid - j * (j + 1) // 2

        row0 = s * rows_per_split
        row1 = tl.minimum(n, row0 + rows_per_split)
        offs_k = tl.arange(0, BLOCK_K)
        offs_i = i * BLOCK + tl.arange(0, BLOCK)
        offs_j = j * BLOCK + tl.arange(0, BLOCK)
        in_i = (offs_i < d)[None, :]
        in_j = (offs_j < d)[None, :]
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        if DESC:
            for k0 in range(row0, row1, BLOCK_K):
                a = x_ptr.load([k0, i * BLOCK])
                b = x_ptr.load([k0, j * BLOCK])
                if HAS_MASK:
                    rows = k0 + offs_k
                    keep = tl.load(mask_ptr + rows, mask=rows < row1, other=0) != 0
                    # a select, not a multiply: padding rows may hold NaN/Inf
                    a = tl.where(keep[:, None], a, tl.zeros_like(a))
                    b = tl.where(keep[:, None], b, tl.zeros_like(b))
                if IEEE:
                    acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(tl.trans(a), b, acc)
        else:
            # Loop-carried pointers (the Triton matmul pattern): one add per step. 64-bit strides
            # once, at set-up (strided views of huge tensors); a stride of 1 arrives as a
            # constexpr int, which has no .to(), hence the multiply by an int64 scalar.
            sn = tl.full((), 1, tl.int64) * stride_xn
            base = x_ptr + row0.to(tl.int64) * sn
            a_ptrs = base + offs_k[:, None] * sn + offs_i[None, :].to(tl.int64) * stride_xd
            b_ptrs = base + offs_k[:, None] * sn + offs_j[None, :].to(tl.int64) * stride_xd
            step = BLOCK_K * sn
            for k0 in range(row0, row1, BLOCK_K):
                rows = k0 + offs_k
                keep = rows < row1
                if HAS_MASK:
                    keep = keep & (tl.load(mask_ptr + rows, mask=keep, other=0) != 0)
                a = tl.load(a_ptrs, mask=keep[:, None] & in_i, other=0.0)
                b = tl.load(b_ptrs, mask=keep[:, None] & in_j, other=0.0)
                if IEEE:
                    acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(tl.trans(a), b, acc)
                a_ptrs += step
                b_ptrs += step
        c_mask = (offs_i < d)[:, None] & (offs_j < d)[None, :]
        c_off = offs_i.to(tl.int64)[:, None] * stride_acc + offs_j[None, :]
        if SPLIT:
            tl.store(acc_ptr + s.to(tl.int64) * split_stride + c_off, acc, mask=c_mask)
        elif ACC_DESC:
            prev = acc_ptr.load([i * BLOCK, j * BLOCK])
            acc_ptr.store([i * BLOCK, j * BLOCK], prev + acc)
        else:
            prev = tl.load(acc_ptr + c_off, mask=c_mask, other=0.0)
            tl.store(acc_ptr + c_off, prev + acc, mask=c_mask)

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
    if interpreting():
        fix_interpreter_bf16_dot()
    ieee = x.dtype == torch.float32 and not allow_tf32
    desc = _tma_ok(x)
    cfg = _config_for(("ieee" if ieee else ("tf32" if x.dtype == torch.float32 else "16bit")) if desc else "pointer")
    t = -(-d // cfg.BLOCK)
    pairs = t * (t + 1) // 2
    split = split_count(pairs, n, acc.device)
    rows_per_split = -(-n // split)
    rows_per_split = -(-rows_per_split // cfg.BLOCK_K) * cfg.BLOCK_K  # whole BLOCK_K steps per split
    split = -(-n // rows_per_split)
    # The workspace is zeroed: tiles below the block diagonal are never written, and a fixed-order
    # sum over the partials keeps the result deterministic.
    out = acc if split == 1 else torch.zeros(split, d, d, dtype=torch.float32, device=acc.device)
    # Triton launches on the *current* device: with device_map layers on cuda:1+ that must be x's.
    with torch.cuda.device(acc.device) if acc.device.type == "cuda" else contextlib.nullcontext():
        x_arg = x
        if desc:
            from triton.tools.tensor_descriptor import TensorDescriptor

            x_arg = TensorDescriptor(x, list(x.shape), list(x.stride()), [cfg.BLOCK_K, cfg.BLOCK])
        acc_desc = desc and split == 1 and _tma_ok(acc)
        out_arg = out
        if acc_desc:
            out_arg = TensorDescriptor(acc, list(acc.shape), list(acc.stride()), [cfg.BLOCK, cfg.BLOCK])
        _kernel()[(pairs, split)](
            x_arg, mask_arg, out_arg, n, d, x.stride(0), x.stride(1), acc.stride(0), rows_per_split, d * d,
            HAS_MASK=mask is not None, IEEE=ieee, SPLIT=split > 1, DESC=desc, ACC_DESC=acc_desc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs,
        )
        if split > 1:
            acc.add_(out.sum(dim=0))

