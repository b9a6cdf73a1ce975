"""Whether Triton kernels can run here, and how (compiled on a GPU, or the CPU interpreter).

The interpreter (``TRITON_INTERPRET=1``) must be set before any ``@triton.jit`` body is
first run; kernel modules are therefore imported lazily, on first use.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable_on(device: torch.device) -> bool:
    if not triton_installed():
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()


_DOT_PATCHED = False


def fix_interpreter_bf16_dot() -> None:
    """Make the CPU interpreter's ``tl.dot`` multiply bf16 tiles as numbers (idempotent).

    Why: Triton's interpreter stores bf16 as uint16 bit patterns and its ``create_dot`` hands
    them to ``np.matmul`` as integers (fp8 is converted, bf16 is not), so a kernel's real bf16
    ``tl.dot`` path could never run under the interpreter. This converts bf16 operands to fp32
    first, which is what the tensor cores compute (exact bf16 products, fp32 accumulation), so
    the tests exercise the GPU code path instead of an fp32 stand-in. Only the interpreter's
    builder is touched; compiled kernels are unaffected.
    """
    global _DOT_PATCHED
    if _DOT_PATCHED or not interpreting():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def f32(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h
                data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interp.TensorHandle(data, tl.float32)

            a, b = f32(a), f32(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot
    _DOT_PATCHED = True
