"""Backend choice, in one place, for every op.

``backend="auto"`` takes cuda, then triton, for GPU tensors and the C++ ``cpu`` backend for CPU
tensors, falling back to the ``torch`` reference when nothing compiled is available.
``PMKERNELS_BACKEND`` overrides "auto" (never an explicit choice). Asking explicitly for a
backend that cannot run on the given device is an error naming why.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")


def select_backend(
    op: str,
    requested: str,
    device: torch.device,
    available: Mapping[str, Callable[[torch.device], str | None]],
    *,
    gpu_order: Sequence[str] | None = None,
) -> str:
    """Pick a backend for ``op`` on ``device``.

    ``available[name](device)`` returns None when that backend can run on ``device``, else a
    short reason why not. "torch" is always available. ``gpu_order`` replaces the default
    preference (cuda, triton, torch) for CUDA devices, for ops whose best backend depends on
    the GPU (covariance on Hopper: Triton's wgmma/TMA kernel over the mma.sync CUDA one).
    """
    device = torch.device(device)
    if requested not in (*BACKENDS, "auto"):
        raise ValueError(f"{op}: unknown backend {requested!r}; choose one of {('auto', *BACKENDS)}")
    if requested == "auto":
        env = os.environ.get("PMKERNELS_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"PMKERNELS_BACKEND={env!r} is not one of {BACKENDS}")
            requested = env
        else:
            if device.type == "cuda":
                order = tuple(gpu_order) if gpu_order is not None else ("cuda", "triton", "torch")
            else:
                order = ("cpu", "torch")
            for name in order:
                if name == "torch" or available.get(name, _never)(device) is None:
                    return name
            return "torch"
    if requested == "torch":
        return "torch"
    reason = available.get(requested, _never)(device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {requested!r} cannot run on {device}: {reason}")
    return requested


def _never(device: torch.device) -> str:
    return "not implemented for this op"
