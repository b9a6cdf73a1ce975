"""Bench section ``solve``: the EMMET closed form and batched small SPD solves vs the usual code.

EMMET reference: what the research code does per batch, in fp64: ``torch.inverse(C)``, then
D = KᵀC⁻¹K + λₑI, ``torch.inverse(D)`` (``pinv`` if that fails), Δ = R D⁻¹ KᵀC⁻¹. Ours:
``pm_delta`` from C0 (factorization, condition estimate and residual included), and, as a
separate row, with C factored once outside the timing (sequential-batched editing reuses it).
Every row records how far its Δ is from the reference's (the issue asks for 1e-8 relative) and
from an independent, more accurate solution: once E > d, D = KᵀC⁻¹K + λₑI is so ill-conditioned
that the explicit inverses themselves are off by more than 1e-8, and the figures say which side
is the accurate one.

Batched reference: a Python loop of ``torch.linalg.cholesky`` + ``cholesky_solve`` per matrix;
torch's own batched calls are timed in the same rounds, and extra rows give each provider's
ratio against them. ``batched_spd_solve`` is timed through its public API (input checks,
jitter bookkeeping included).
"""
from __future__ import annotations

import dataclasses
import importlib

import torch

from pmedit.bench.harness import Row, compare

ORDER = 20
HELP = "Cholesky solves: EMMET closed form vs explicit fp64 inverses; batched SPD solves vs a Python loop"
SECTION = "solve"
_AGREE = 1e-8  # the "same result" tolerance, relative Frobenius


def _reference_emmet(R, K, C, lam_e):
    Ci = torch.inverse(C)
    D = K.mT @ Ci @ K + lam_e * torch.eye(K.shape[1], dtype=C.dtype, device=C.device)
    try:
        Di = torch.inverse(D)
    except RuntimeError:  # singular D: the research code falls back to the pseudo-inverse
        Di = torch.linalg.pinv(D)
    return R @ Di @ K.mT @ Ci


def _accurate_emmet(R, K, C, lam_e):
    """An independent, more accurate Δ to judge both sides by.

    With λₑ > 0, the dual form Δ = RKᵀ(KKᵀ + λₑC)⁻¹ solved by LU (not Cholesky) plus two steps
    of fp64 iterative refinement: its matrix is far better conditioned than D = KᵀC⁻¹K + λₑI
    once E > d, which is exactly where explicit inverses lose digits. With λₑ = 0 (E ≤ d,
    well-conditioned D here) the explicit formula itself is accurate and is used.
    """
    if lam_e == 0:
        return _reference_emmet(R, K, C, lam_e)
    M = K @ K.mT + lam_e * C
    B = K @ R.mT
    X = torch.linalg.solve(M, B)
    for _ in range(2):
        X = X + torch.linalg.solve(M, B - M @ X)
    return X.mT


def _emmet_problem(d, d_out, E, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64, device=device)
    # A second moment with a decaying spectrum, like MLP keys: X Xᵀ/N with column scales 1..1e-2.
    X = torch.randn(d, 2 * d, **kw) * torch.logspace(0, -2, 2 * d, dtype=torch.float64, device=device)
    C0 = X @ X.mT / (2 * d)
    del X
    K = torch.randn(d, E, **kw)
    R = torch.randn(d_out, E, **kw)
    return C0, K, R


def _emmet_case(d, d_out, E, lam_e, device, *, repeats, with_fp32=True) -> list[Row]:
    from pmkernels.solve import SPDFactor, pm_delta

    lam = 1.0
    C0, K, R = _emmet_problem(d, d_out, E, device)
    ref = _reference_emmet(R, K, lam * C0, lam_e)
    fac = SPDFactor(lam * C0)
    fns = {
        "reference inv() fp64": lambda: _reference_emmet(R, K, lam * C0, lam_e),
        "pm_delta fp64": lambda: pm_delta(R, K, C0, lam=lam, ridge=lam_e),
        "pm_delta fp64, C factored once": lambda: pm_delta(R, K, fac, ridge=lam_e),
    }
    if with_fp32:
        fns["pm_delta fp32+refine"] = lambda: pm_delta(R, K, C0, lam=lam, ridge=lam_e, precision="fp32")
    truth = _accurate_emmet(R, K, lam * C0, lam_e)
    ref_err = float((ref - truth).norm() / truth.norm())
    agreement, accuracy, route = {}, {}, None
    for name, fn in fns.items():
        if name.startswith("reference"):
            continue
        out = fn()
        route = out.route
        agreement[name] = float((out.delta - ref).norm() / ref.norm())
        accuracy[name] = float((out.delta - truth).norm() / truth.norm())
        if agreement[name] > _AGREE:
            print(f"  note: {name} differs from the reference by {agreement[name]:.1e} (> {_AGREE:g}); "
                  f"its error vs the accurate solution is {accuracy[name]:.1e}, the reference's {ref_err:.1e}")
        del out
    rows = compare(
        SECTION,
        f"EMMET d={d} d_out={d_out} E={E} lam_e={lam_e:g} {device.type}",
        fns,
        reference="reference inv() fp64",
        work=E,
        unit="edit",
        repeats=repeats,
        warmup=1,
        device=device,
    )
    for r in rows:
        if r.provider in agreement:
            r.extra.update(rel_diff_vs_reference=agreement[r.provider], rel_err_vs_accurate=accuracy[r.provider],
                           route=route)
        else:
            r.extra.update(rel_err_vs_accurate=ref_err)
    print(f"  route {route}; relative difference from the reference: "
          + ", ".join(f"{k}: {v:.1e}" for k, v in agreement.items())
          + f"; error vs an accurate solution: reference {ref_err:.1e}, "
          + ", ".join(f"{k}: {v:.1e}" for k, v in accuracy.items()))
    return rows


def _batched_case(b, n, m, dtype, device, *, repeats) -> list[Row]:
    from pmkernels.batched_solve import batched_spd_solve

    g = torch.Generator(device="cpu").manual_seed(1)
    X = torch.randn(b, n, 2 * n, generator=g, dtype=torch.float64)
    A = (X @ X.mT / (2 * n)).to(dtype=dtype, device=device)
    A = 0.5 * (A + A.mT)
    B = torch.randn(b, n, m, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    def loop():
        for i in range(b):
            torch.cholesky_solve(B[i], torch.linalg.cholesky(A[i]))

    fns = {
        "python loop cholesky+cholesky_solve": loop,
        "torch batched cholesky+cholesky_solve": lambda: torch.cholesky_solve(B, torch.linalg.cholesky(A)),
    }
    for name in ("torch", "cpu", "triton", "cuda"):
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter is for tests, not timing
        try:
            mod = importlib.import_module(f"pmkernels.batched_solve_{name}")
        except ImportError:
            continue
        if mod.unavailable_reason(device) is None:
            fns[f"batched_spd_solve[{name}]"] = lambda nm=name: batched_spd_solve(A, B, backend=nm)
    ref = torch.cholesky_solve(B, torch.linalg.cholesky(A))
    for name, fn in fns.items():
        if name.startswith("batched"):
            err = float((fn().X - ref).norm() / ref.norm())
            if err > (1e-10 if dtype == torch.float64 else 1e-3):
                print(f"  WARNING: {name} differs from torch by {err:.2e}")
    dt = str(dtype).replace("torch.", "")
    case = f"batched SPD b={b} n={n} m={m} {dt} {device.type}"
    rows = compare(SECTION, case, fns, reference="python loop cholesky+cholesky_solve", work=b, unit="sys",
                   flops=b * (n**3 / 3 + 2 * n * n * m), repeats=repeats, warmup=1, device=device,
                   min_time_s=0.2)
    base = next(r for r in rows if r.provider == "torch batched cholesky+cholesky_solve")
    derived = [
        dataclasses.replace(r, case=case + " [ratio vs torch batched]", ratio=base.median_s / r.median_s,
                            reference=base.provider, extra=dict(r.extra))
        for r in rows
        if r.provider.startswith("batched") or r.provider == base.provider
    ]
    return rows + derived


def run(quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    cpu = torch.device("cpu")
    if quick:
        rows += _emmet_case(1536, 576, 256, 0.0, cpu, repeats=3)
        rows += _emmet_case(768, 576, 1536, 0.1, cpu, repeats=3)
        rows += _batched_case(1024, 64, 16, torch.float64, cpu, repeats=3)
    else:
        # The CPU targets: >= 3x the explicit-inverse reference, same result to 1e-8.
        rows += _emmet_case(1536, 576, 256, 0.0, cpu, repeats=5)
        rows += _emmet_case(1536, 576, 4096, 0.1, cpu, repeats=3)
        # >= 10x a Python loop of cholesky + cholesky_solve.
        rows += _batched_case(1024, 64, 16, torch.float64, cpu, repeats=5)
        rows += _batched_case(1024, 64, 16, torch.float32, cpu, repeats=5)
    if torch.cuda.is_available():
        gpu = torch.device("cuda", torch.cuda.current_device())
        if quick:
            rows += _emmet_case(4096, 1024, 1024, 0.0, gpu, repeats=3)
            rows += _batched_case(1024, 64, 16, torch.float64, gpu, repeats=3)
        else:
            # GPU targets: >= 5x on EMMET (d=14336 is Llama-3-8B's intermediate size), >= 10x batched.
            rows += _emmet_case(14336, 4096, 4096, 0.0, gpu, repeats=3)
            rows += _batched_case(1024, 64, 16, torch.float64, gpu, repeats=5)
            rows += _batched_case(1024, 64, 16, torch.float32, gpu, repeats=5)
    return rows
