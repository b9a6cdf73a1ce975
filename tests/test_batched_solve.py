"""batched_spd_solve: every backend against a loop of fp64 torch.linalg solves.

Tolerances: the solution error of a backward-stable solve is ~κ·n·u; the matrices here have
κ ≤ 1e4, so fp64 results agree with the fp64 reference to 1e-10 and fp32 ones to κ·u32·10 ≈ 1e-2
(checked instead on the backward residual ‖AX − B‖/(‖A‖‖X‖) ≤ 1e-5, n·u32 with slack).
Triton runs through its interpreter on CPU (slow): few, small cases.
"""
from __future__ import annotations

import math

import pytest
import torch

from pmkernels import batched_solve_triton
from pmkernels.batched_solve import batched_spd_solve
from pmkernels.solve import NotSPDError

F64 = torch.float64


def spd_batch(b, n, dtype=F64, seed=0, cond=1e3):
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(b, n, n, dtype=F64)
    for i in range(b):
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
        lam = torch.logspace(0, -math.log10(cond) * (i + 1) / b, n, dtype=F64) * (1 + i)
        A = (Q * lam) @ Q.mT
        out[i] = 0.5 * (A + A.mT)
    return out.to(dtype)


def rhs(b, n, m, dtype=F64, seed=1):
    return torch.randn(b, n, m, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def loop_reference(A, B):
    """The Python loop the batched call replaces: Cholesky + cholesky_solve per matrix, fp64."""
    return torch.stack([torch.cholesky_solve(B[i].double(), torch.linalg.cholesky(A[i].double()))
                        for i in range(A.shape[0])])


def check(A, B, X, dtype):
    ref = loop_reference(A, B)
    if dtype == F64:
        assert float((X - ref).norm() / ref.norm()) < 1e-10
    else:
        Ad, Xd = A.double(), X.double()
        back = (Ad @ Xd - B.double()).flatten(1).norm(dim=1) / (
            torch.linalg.matrix_norm(Ad) * Xd.flatten(1).norm(dim=1))
        assert float(back.max()) < 1e-5
        assert float((Xd - ref).norm() / ref.norm()) < 1e-2


def _triton_ok():
    return batched_solve_triton.unavailable_reason(torch.device("cpu")) is None


BACKENDS = ["torch", "cpu", pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="no Triton"))]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("n,m", [(1, 1), (5, 3), (33, 1), (64, 16), (100, 7), (257, 2)])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_matches_loop(backend, n, m, dtype):
    b = 6 if n < 200 else 2
    A, B = spd_batch(b, n, dtype, seed=n), rhs(b, n, m, dtype, seed=m)
    res = batched_spd_solve(A, B, backend=backend)
    assert res.backend == backend and res.X.shape == (b, n, m) and res.X.dtype == dtype
    assert not res.info.any() and not res.jitter.any()
    check(A, B, res.X, dtype)


@pytest.mark.skipif(not _triton_ok(), reason="Triton interpreter unavailable")
@pytest.mark.parametrize("n,m,dtype", [(1, 1, F64), (7, 3, torch.float32), (64, 17, F64), (70, 2, torch.float32),
                                       (97, 1, F64)])
def test_triton_matches_loop(n, m, dtype):
    # 64 is the largest single register tile; 70 and 97 take the blocked path (3 and 4 blocks),
    # m = 17 takes two right-hand-side chunks.
    b = 2
    A, B = spd_batch(b, n, dtype, seed=n), rhs(b, n, m, dtype, seed=m)
    res = batched_spd_solve(A, B, backend="triton")
    assert res.backend == "triton" and not res.info.any()
    check(A, B, res.X, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("n,m,dtype", [(1, 1, F64), (33, 5, torch.float32), (64, 64, F64), (130, 3, F64),
                                       (200, 9, F64), (256, 40, torch.float32)])
def test_gpu_backends_match_loop(backend, n, m, dtype):
    A, B = spd_batch(9, n, dtype, seed=n).cuda(), rhs(9, n, m, dtype, seed=m).cuda()
    res = batched_spd_solve(A, B, backend=backend)
    assert res.backend == backend and not res.info.any()
    check(A.cpu(), B.cpu(), res.X.cpu(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jitter_per_matrix_and_failure_reporting(backend):
    n = 12
    A = spd_batch(4, n, seed=3)
    X = torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    A[1] = X @ X.mT  # rank 4: semidefinite, rescued by jitter
    A[2] = -A[2]  # negative definite: never rescued
    B = rhs(4, n, 2)
    A0, B0 = A.clone(), B.clone()
    res = batched_spd_solve(A, B, backend=backend, check=False)
    assert torch.equal(A, A0) and torch.equal(B, B0)
    assert res.info.tolist()[0] == 0 and res.info.tolist()[1] == 0 and res.info.tolist()[3] == 0
    assert res.info[2] == 1  # the very first pivot is negative
    assert res.jitter[0] == 0 and res.jitter[3] == 0 and res.jitter[1] > 0
    assert bool(res.X[2].isnan().all()) and not res.X[[0, 1, 3]].isnan().any()
    J = A[1] + res.jitter[1] * torch.eye(n, dtype=F64)
    assert float((J @ res.X[1] - B[1]).norm() / (J.norm() * res.X[1].norm())) < 1e-12
    check(A[[0, 3]], B[[0, 3]], res.X[[0, 3]], F64)
    with pytest.raises(NotSPDError, match=r"1 of 4 matrices .* matrix 2 \(Cholesky failed at pivot 1\), λ_min <= -"):
        batched_spd_solve(A, B, backend=backend)


def test_matches_torch_batched_with_jitter_on_any_backend():
    A = spd_batch(5, 9, seed=4)
    A[3] = torch.ones(9, 9, dtype=F64)  # rank one
    B = rhs(5, 9, 3)
    a = batched_spd_solve(A, B, backend="torch")
    c = batched_spd_solve(A, B, backend="cpu")
    assert torch.equal(a.jitter, c.jitter) and a.jitter[3] > 0
    ok = [0, 1, 2, 4]
    assert float((a.X[ok] - c.X[ok]).norm() / a.X[ok].norm()) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_vector_rhs_and_empty(backend):
    A, B = spd_batch(3, 6), rhs(3, 6, 1)
    v = batched_spd_solve(A, B[..., 0], backend=backend)
    assert v.X.shape == (3, 6)
    assert torch.allclose(v.X, batched_spd_solve(A, B, backend=backend).X[..., 0])
    e = batched_spd_solve(torch.zeros(0, 4, 4, dtype=F64), torch.zeros(0, 4, 2, dtype=F64), backend=backend)
    assert e.X.shape == (0, 4, 2) and e.info.shape == (0,)
    z = batched_spd_solve(torch.zeros(3, 0, 0, dtype=F64), torch.zeros(3, 0, 5, dtype=F64), backend=backend)
    assert z.X.shape == (3, 0, 5)
    w = batched_spd_solve(A, torch.zeros(3, 6, 0, dtype=F64), backend=backend)
    assert w.X.shape == (3, 6, 0)


def test_auto_picks_compiled_cpu(monkeypatch):
    monkeypatch.delenv("PMKERNELS_BACKEND", raising=False)
    res = batched_spd_solve(spd_batch(2, 4), rhs(2, 4, 1))
    assert res.backend == "cpu"


def test_gpu_kernels_refuse_oversized_matrices():
    if not _triton_ok():
        pytest.skip("Triton interpreter unavailable")
    with pytest.raises(RuntimeError, match="n=257 > 256"):
        batched_spd_solve(spd_batch(1, 257), rhs(1, 257, 1), backend="triton")


@pytest.mark.parametrize(
    "A, B, match",
    [
        (torch.ones(2, 3, 4, dtype=F64), torch.ones(2, 3, 1, dtype=F64), r"A must be \[b, n, n\]"),
        (torch.eye(3, dtype=F64), torch.ones(3, 1, dtype=F64), r"A must be \[b, n, n\]"),
        (torch.eye(3, dtype=F64).expand(2, 3, 3), torch.ones(3, 3, 1, dtype=F64), r"B must be \[b=2, n=3, m\]"),
        (torch.eye(3, dtype=F64).expand(2, 3, 3), torch.ones(2, 3, 1, dtype=torch.float32), "B is torch.float32"),
        (torch.eye(3, dtype=torch.int32).expand(2, 3, 3), torch.ones(2, 3, 1, dtype=torch.int32), "float32 or float64"),
    ],
)
def test_rejects_bad_shapes(A, B, match):
    with pytest.raises(ValueError, match=match):
        batched_spd_solve(A, B)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_rejects_nonfinite_and_asymmetric_naming_the_matrix(backend):
    A, B = spd_batch(4, 5), rhs(4, 5, 2)
    bad = A.clone()
    bad[2, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"A has 1 non-finite entries; first in matrix 2 at \[1, 3\]"):
        batched_spd_solve(bad, B, backend=backend)
    badB = B.clone()
    badB[3, 0, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"B has 1 non-finite entries; first in matrix 3 at \[0, 1\]"):
        batched_spd_solve(A, badB, backend=backend)
    asym = A.clone()
    asym[1, 0, 4] += 0.5
    with pytest.raises(ValueError, match=r"1 matrices are not symmetric; matrix 1"):
        batched_spd_solve(asym, B, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequential_emmet_batches_in_one_call(backend):
    """The use the issue names: every batch's D_b = K_bᵀC⁻¹K_b + λₑI formed up front from one
    factor of C and solved in one batched call gives each batch's pm_delta."""
    from pmkernels.solve import SPDFactor, pm_delta

    d, d_out, E, nb, lam_e = 24, 7, 5, 3, 0.2
    g = torch.Generator().manual_seed(5)
    X = torch.randn(d, 3 * d, generator=g, dtype=F64)
    C = X @ X.mT / (3 * d)
    Ks = torch.randn(nb, d, E, generator=g, dtype=F64)
    Rs = torch.randn(nb, d_out, E, generator=g, dtype=F64)
    fac = SPDFactor(C)
    D = torch.stack([fac.inv_quad(Ks[i]) for i in range(nb)]) + lam_e * torch.eye(E, dtype=F64)
    Y = batched_spd_solve(D, Rs.mT.contiguous(), backend=backend).X  # [nb, E, d_out]
    for i in range(nb):
        delta = (fac.solve(Ks[i]) @ Y[i]).mT
        ref = pm_delta(Rs[i], Ks[i], fac, ridge=lam_e).delta
        assert float((delta - ref).norm() / ref.norm()) < 1e-11


def test_cuda_trailing_update_packing_covers_the_lower_triangle_once():
    """csrc/batched_solve_cuda.cu walks the trailing lower triangle packed, t -> (i, j), j <= i,
    via an fp32 sqrt and two fix-ups; replayed in numpy float32 for every size up to n = 1024."""
    import numpy as np

    for r in (1, 2, 3, 63, 64, 255, 1023):
        t = np.arange(r * (r + 1) // 2, dtype=np.int64)
        ii = ((np.sqrt(np.float32(8.0) * t.astype(np.float32) + np.float32(1.0)) - np.float32(1.0))
              * np.float32(0.5)).astype(np.int64)
        ii = np.where((ii + 1) * (ii + 2) // 2 <= t, ii + 1, ii)
        ii = np.where(ii * (ii + 1) // 2 > t, ii - 1, ii)
        jj = t - ii * (ii + 1) // 2
        assert (jj >= 0).all() and (jj <= ii).all() and (ii < r).all()
        assert len(np.unique(ii * r + jj)) == len(t)


def test_triton_launch_params_and_warps_override(monkeypatch):
    p = batched_solve_triton.launch_params(64, 16)
    assert (p["BS"], p["NB"], p["BM"], p["MP"], p["num_warps"]) == (64, 1, 16, 16, 8)
    assert batched_solve_triton.launch_params(97, 17)["NB"] == 4
    monkeypatch.setenv("PMKERNELS_TRITON_SOLVE_WARPS", "4")
    assert batched_solve_triton.launch_params(64, 16)["num_warps"] == 4
    monkeypatch.setenv("PMKERNELS_TRITON_SOLVE_WARPS", "3")
    with pytest.raises(ValueError, match="PMKERNELS_TRITON_SOLVE_WARPS"):
        batched_solve_triton.launch_params(64, 16)


@pytest.mark.cuda
def test_gpu_backends_on_a_second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = f"cuda:{torch.cuda.device_count() - 1}"
    A, B = spd_batch(5, 64, seed=2), rhs(5, 64, 3)
    for backend in ("triton", "cuda"):
        res = batched_spd_solve(A.to(dev), B.to(dev), backend=backend)
        assert res.X.device == torch.device(dev)
        check(A, B, res.X.cpu(), F64)
