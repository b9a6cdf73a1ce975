"""pytest-benchmark suite for pmkernels.solve and pmkernels.batched_solve
(run: python -m pytest benchmarks/test_solve.py).

Small shapes, so it finishes in well under a minute on 2 cores; the issue's targets are measured
by ``python -m pmedit.bench solve`` (interleaved rounds, ratios in one run). Grouped by case so
pytest-benchmark's table puts each provider next to the research code's explicit inverses.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from pmkernels.batched_solve import batched_spd_solve
from pmkernels.solve import SPDFactor, pm_delta

D, D_OUT = 512, 192


def _spd(n: int, *, batch: tuple[int, ...] = (), dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, 2 * n, generator=g, dtype=dtype)
    return x @ x.transpose(-1, -2) / (2 * n) + 0.1 * torch.eye(n, dtype=dtype)


def _problem(E: int):
    g = torch.Generator().manual_seed(1)
    return _spd(D), torch.randn(D_OUT, E, generator=g, dtype=torch.float64), torch.randn(D, E, generator=g, dtype=torch.float64)


def _reference_emmet(R, K, C0, lam_e):
    """The unified-model-editing code: explicit fp64 inverses of C and of D = KᵀC⁻¹K + λₑI."""
    c_inv = torch.inverse(C0)
    d = K.T @ c_inv @ K + lam_e * torch.eye(K.shape[1], dtype=K.dtype)
    return R @ torch.inverse(d) @ K.T @ c_inv


@pytest.mark.parametrize("provider", ["reference inverse", "pm_delta from C0", "pm_delta, C factored once"])
@pytest.mark.parametrize("E", [64, 1024])
def test_emmet_closed_form(benchmark, provider, E):
    C0, R, K = _problem(E)
    lam_e = 0.1
    benchmark.group = f"EMMET d={D} E={E}"
    if provider == "reference inverse":
        benchmark(_reference_emmet, R, K, C0, lam_e)
    elif provider == "pm_delta from C0":
        benchmark(lambda: pm_delta(R, K, C0, ridge=lam_e).delta)
    else:
        fac = SPDFactor(C0)
        benchmark(lambda: pm_delta(R, K, fac, ridge=lam_e).delta)


@pytest.mark.parametrize("provider", ["python loop", "torch batched", "torch", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_batched_spd_solve(benchmark, provider, dtype):
    b, n, m = 256, 64, 4
    device = torch.device("cuda" if provider in ("triton", "cuda") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if provider in ("torch", "cpu", "triton", "cuda"):
        reason = importlib.import_module(f"pmkernels.batched_solve_{provider}").unavailable_reason(device)
        if reason is not None:
            pytest.skip(reason)
    A = _spd(n, batch=(b,), dtype=dtype).to(device)
    B = torch.randn(b, n, m, dtype=dtype).to(device)
    benchmark.group = f"batched SPD solve b={b} n={n} {str(dtype)[6:]}"
    if provider == "python loop":
        def run():
            return [torch.cholesky_solve(B[i], torch.linalg.cholesky(A[i])) for i in range(b)]
    elif provider == "torch batched":
        def run():
            return torch.cholesky_solve(B, torch.linalg.cholesky(A))
    else:
        def run():
            out = batched_spd_solve(A, B, backend=provider).X
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
