"""Bench section ``covariance``: SecondMoment.update throughput per backend vs the MEMIT way.

The reference is what the MEMIT code does per batch: ``acc += x.T @ x`` in fp32 (on a GPU the
same after casting the batch to fp32). On a GPU, ``torch.mm(x.T, x, out_dtype=float32)`` on
bf16 input (cuBLAS has no bf16 SYRK) is the stronger baseline. Each backend is timed through
the public ``SecondMoment.update`` (input checks, NaN scan and fp64 flushes included).
TFLOP/s are *effective*: 2·n·d² for every provider, as if the full product were computed, so
the TFLOP/s column compares like the time column.
"""
from __future__ import annotations

import importlib

import torch

from pmedit.bench.harness import Row, compare

ORDER = 10
HELP = "streaming second moments S += xᵀx: pmkernels backends vs fp32 x.T @ x (MEMIT)"
SECTION = "covariance"


def _backends_on(device: torch.device) -> list[str]:
    names = []
    for name in ("torch", "cpu", "triton", "cuda"):
        if name == "triton" and device.type == "cpu":
            continue  # the Triton interpreter is for tests, not for timing
        try:
            mod = importlib.import_module(f"pmkernels.covariance_{name}")
            if mod.unavailable_reason(device) is None:
                names.append(name)
        except ImportError:
            continue
    return names


def _case(d: int, n: int, dtype: torch.dtype, device: torch.device, *, repeats: int, gpu_baselines: bool) -> list[Row]:
    from pmkernels.covariance import SecondMoment

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=g).to(dtype)
    ref_acc = torch.zeros(d, d, dtype=torch.float32, device=device)

    def reference():
        xf = x.float()
        ref_acc.addmm_(xf.T, xf)

    fns = {"reference fp32 x.T@x": reference}
    if gpu_baselines:
        try:
            torch.mm(x[:8].T, x[:8], out_dtype=torch.float32)
            fns["torch.mm out_dtype=fp32"] = lambda: ref_acc.add_(torch.mm(x.T, x, out_dtype=torch.float32))
        except (TypeError, RuntimeError):
            fns["bf16 mm + cast"] = lambda: ref_acc.add_(torch.mm(x.T, x).float())
    for name in _backends_on(device):
        acc = SecondMoment(d, device=device, backend=name)
        fns[f"SecondMoment[{name}]"] = lambda a=acc: a.update(x)
    dt = str(dtype).replace("torch.", "")
    return compare(
        SECTION,
        f"d={d} n={n} {dt} {device.type}",
        fns,
        reference="reference fp32 x.T@x",
        work=n,
        unit="tok",
        flops=2.0 * n * d * d,
        repeats=repeats,
        warmup=1,
        device=device,
    )


def run(quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    cpu = torch.device("cpu")
    if quick:
        rows += _case(1024, 4096, torch.float32, cpu, repeats=3, gpu_baselines=False)
    else:
        # The CPU target: cpu backend >= 1.6x the fp32 reference (limit 2x).
        rows += _case(2048, 16384, torch.float32, cpu, repeats=5, gpu_baselines=False)
        rows += _case(2048, 4096, torch.bfloat16, cpu, repeats=3, gpu_baselines=False)
    if torch.cuda.is_available():
        gpu = torch.device("cuda", torch.cuda.current_device())
        if quick:
            rows += _case(4096, 16384, torch.bfloat16, gpu, repeats=3, gpu_baselines=True)
        else:
            # The GPU target: triton/cuda >= 1.5x torch.mm(out_dtype=fp32), >= 8x fp32.
            rows += _case(14336, 65536, torch.bfloat16, gpu, repeats=5, gpu_baselines=True)
            # Small d (SmolLM2's 1536: 78 output tiles on 132 SMs): where the token split matters.
            rows += _case(1536, 65536, torch.bfloat16, gpu, repeats=10, gpu_baselines=True)
    return rows
