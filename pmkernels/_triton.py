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
