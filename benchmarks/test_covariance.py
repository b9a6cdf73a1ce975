"""pytest-benchmark suite for pmkernels.covariance (run: python -m pytest benchmarks/test_covariance.py).

Small shapes, so it finishes in seconds on a laptop; the issue's targets are measured by
``python -m pmedit.bench covariance`` (interleaved rounds, ratios in one run). Grouped by
shape so pytest-benchmark's table compares providers side by side.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from pmkernels.covariance import SecondMoment

CASES = [(512, 4096, torch.float32), (1024, 2048, torch.float32), (1024, 2048, torch.bfloat16)]
PROVIDERS = ["reference", "torch", "cpu", "triton", "cuda"]


def _device(provider: str) -> torch.device:
    if provider in ("triton", "cuda"):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("d,n,dtype", CASES, ids=[f"d{d}-n{n}-{str(t)[6:]}" for d, n, t in CASES])
def test_update_throughput(benchmark, provider, d, n, dtype):
    device = _device(provider)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if provider != "reference":
        mod = importlib.import_module(f"pmkernels.covariance_{provider}")
        reason = mod.unavailable_reason(device)
        if reason is not None:
            pytest.skip(reason)
    benchmark.group = f"covariance d={d} n={n} {dtype}"
    benchmark.extra_info.update(tokens=n, flops=2.0 * n * d * d)
    x = torch.randn(n, d, device=device).to(dtype)
    if provider == "reference":  # the MEMIT way: fp32 x.T @ x added into an fp32 sum
        acc = torch.zeros(d, d, device=device)

        def step():
            xf = x.float()
            acc.addmm_(xf.T, xf)
    else:
        sm = SecondMoment(d, device=device, backend=provider)

        def step():
            sm.update(x)

    def run():
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
