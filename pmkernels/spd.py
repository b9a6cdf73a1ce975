"""Symmetric positive-definite factors: Cholesky with bounded jitter, condition estimates and
O(d²k) rank updates, never an explicit inverse.

The preservation matrix C = λ·C0 of every editing method is SPD but often numerically
semidefinite (C0 from a finite corpus); :class:`SPDFactor` adds the least relative jitter that
makes Cholesky succeed, says how much it added and how ill-conditioned the matrix is, and is
reused across batches (``rank_update`` folds edited keys into it). The closed forms that use it
are in :mod:`pmkernels.solve`.
"""
from __future__ import annotations

import logging
import math

import torch

__all__ = ["SPDFactor", "NotSPDError", "rank_update"]

log = logging.getLogger(__name__)


# First relative jitter tried (times mean(diag A)), per dtype; each retry multiplies it by 10.
# Sized a few ulps above the rounding noise of a Cholesky pivot so that a well-posed but
# semidefinite matrix (D = KᵀC⁻¹K with dependent keys) is rescued with the least perturbation.
_DEFAULT_EPS = {torch.float64: 1e-14, torch.float32: 1e-7}
_DEFAULT_RETRIES = 6


class NotSPDError(ValueError):
    """A matrix stayed non-positive-definite through the whole jitter budget."""


def _finite_or_raise(name: str, x: torch.Tensor) -> None:
    # A finite sum proves every entry finite (NaN/Inf propagate): one reduction, no bool temp.
    # Only a non-finite sum (or an overflowing one) pays for the scan that names the culprit.
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{name} has {int(bad.sum())} non-finite entries (first at index {idx}: {x[idx].item()})")


def _check_square(name: str, A: torch.Tensor) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(A.shape)}")
    if not A.dtype.is_floating_point or A.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32 or float64, got {A.dtype}")


def _check_symmetric(name: str, A: torch.Tensor) -> None:
    """Refuse a matrix whose two triangles disagree beyond rounding.

    Cholesky reads one triangle only, so an asymmetric input would be silently replaced by its
    lower half. The test is a random probe, ‖Ax − Aᵀx‖ ≤ sqrt(eps)·‖Ax‖ (E‖Mx‖² = ‖M‖_F² for
    Gaussian x), two matrix-vector products instead of a transposed full pass (a cache-hostile
    read that cost as much as a third of the Cholesky at d = 1536); only a failing probe pays
    for the full scan that locates the worst pair. sqrt(eps) tolerates the rounding of products
    like WᵀW, whose two triangles come from differently ordered dot products.
    """
    n = A.shape[0]
    if n < 2:
        return
    gen = torch.Generator(device="cpu").manual_seed(12345)
    x = torch.randn(n, generator=gen, dtype=torch.float64).to(device=A.device, dtype=A.dtype)
    y1, y2 = A @ x, x @ A
    scale = float(y1.norm())
    tol = math.sqrt(torch.finfo(A.dtype).eps)
    gap = float((y1 - y2).norm())
    if gap <= tol * scale:
        return
    diff = (A - A.mT).abs()
    i, j = divmod(int(diff.argmax()), n)
    raise ValueError(
        f"{name} is not symmetric: |{name}[{i},{j}] - {name}[{j},{i}]| = {diff[i, j].item():.3g}; "
        f"‖({name} - {name}ᵀ)x‖ = {gap:.3g} > sqrt(eps)·‖{name}x‖ = {tol * scale:.3g} for a random probe x"
    )


def _lambda_min_bound(A: torch.Tensor, k: int) -> float:
    """An upper bound on λ_min(A): the smallest eigenvalue of its leading k×k block.

    Cholesky failing at pivot k means that block is not positive definite; by Cauchy
    interlacing λ_min(A) ≤ λ_min(A[:k,:k]), and the block is far cheaper than all of A.
    """
    k = max(1, min(int(k), A.shape[0]))
    block = A[:k, :k].to(torch.float64)
    return float(torch.linalg.eigvalsh(0.5 * (block + block.mT))[0])


class SPDFactor:
    """The Cholesky factor L (A + jitter·I = L Lᵀ) of an SPD matrix, factored once and reused.

    ``A`` is never modified. When Cholesky fails, jitter ε·mean(diag A) is added and multiplied
    by 10 per retry, at most ``max_retries`` times; past that, ``NotSPDError`` reports an upper
    bound on A's smallest eigenvalue. ``.jitter`` is the absolute jitter used (0.0 when none).

    The factor keeps a reference to ``A`` (not a copy) so that mixed-precision refinement and
    ``matmul`` can use the exact matrix; low-rank terms added by ``rank_update`` are kept as
    their key blocks. Pass ``keep_matrix=False`` to drop it.
    """

    def __init__(
        self,
        A: torch.Tensor,
        *,
        dtype: torch.dtype | None = None,
        eps: float | None = None,
        max_retries: int = _DEFAULT_RETRIES,
        name: str = "A",
        keep_matrix: bool = True,
        check: bool = True,
        min_pivot: float = 0.0,
    ) -> None:
        _check_square(name, A)
        dtype = dtype or A.dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"SPDFactor: dtype must be float32 or float64, got {dtype}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if check:
            _finite_or_raise(name, A)
            _check_symmetric(name, A)
        self.name = name
        self.n = A.shape[0]
        self.dtype = dtype
        self.device = A.device
        self._A = A if keep_matrix else None
        self._updates: list[torch.Tensor] = []
        self._cond: float | None = None
        eps = _DEFAULT_EPS[dtype] if eps is None else float(eps)

        Ad = A.to(dtype)  # a new tensor only when the dtype changes; never written to
        self.jitter = 0.0
        self.retries = 0
        if self.n == 0:
            self.L = Ad.clone()
            return
        L, info = _cholesky(Ad, min_pivot)
        first_fail = int(info)
        if first_fail != 0:
            mean_diag = float(Ad.diagonal().mean())
            if not mean_diag > 0:
                raise NotSPDError(
                    f"{name} ({self.n}x{self.n}) is not positive definite: mean of its diagonal is "
                    f"{mean_diag:.3g}; λ_min({name}) <= {_lambda_min_bound(Ad, first_fail):.3g}"
                )
            eye = torch.eye(self.n, dtype=dtype, device=A.device)
            for t in range(max_retries):
                jit = eps * mean_diag * 10.0**t
                L, info = _cholesky(Ad + jit * eye, min_pivot)
                if int(info) == 0:
                    self.jitter, self.retries = jit, t + 1
                    break
            else:
                lam = _lambda_min_bound(Ad, first_fail)
                raise NotSPDError(
                    f"{name} ({self.n}x{self.n}, {dtype}) is not positive definite: Cholesky failed at "
                    f"pivot {first_fail} and still failed with jitter up to "
                    f"{eps * 10.0 ** max(max_retries - 1, 0):.1e} x mean(diag)={mean_diag:.3g}; "
                    f"λ_min({name}) <= {lam:.3g} (leading {first_fail}x{first_fail} block)"
                )
            log.info("%s: Cholesky needed jitter %.3g (%.1e x mean diag) after %d retries",
                     name, self.jitter, self.jitter / mean_diag, self.retries)
        self.L = L

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def _from_factor(cls, L: torch.Tensor, *, jitter: float, A, updates, name: str) -> "SPDFactor":
        self = cls.__new__(cls)
        self.name, self.n, self.dtype, self.device = name, L.shape[0], L.dtype, L.device
        self.L, self.jitter, self.retries = L, jitter, 0
        self._A, self._updates, self._cond = A, list(updates), None
        return self

    # ----------------------------------------------------------------------------- solves
    def _rhs(self, B: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
        if not isinstance(B, torch.Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(B).__name__}")
        if B.ndim not in (1, 2) or B.shape[0] != self.n:
            raise ValueError(f"{what}: expected shape [{self.n}] or [{self.n}, m], got {tuple(B.shape)}")
        if B.device != self.device:
            raise ValueError(f"{what}: tensor is on {B.device}, the factor on {self.device}")
        _finite_or_raise(what, B)
        vec = B.ndim == 1
        B = B.to(self.dtype)
        return (B.unsqueeze(1) if vec else B), vec

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """A⁻¹B (of the jittered matrix) by two triangular solves; B is [n] or [n, m]."""
        B2, vec = self._rhs(B, f"{self.name}.solve(B)")
        X = torch.cholesky_solve(B2, self.L)
        return X.squeeze(1) if vec else X

    def whiten(self, K: torch.Tensor) -> torch.Tensor:
        """L⁻¹K: the keys in coordinates where A is the identity."""
        K2, vec = self._rhs(K, f"{self.name}.whiten(K)")
        W = torch.linalg.solve_triangular(self.L, K2, upper=False)
        return W.squeeze(1) if vec else W

    def inv_quad(self, K: torch.Tensor) -> torch.Tensor:
        """KᵀA⁻¹K = (L⁻¹K)ᵀ(L⁻¹K), symmetric by construction; never forms A⁻¹."""
        W = self.whiten(K)
        if W.ndim == 1:
            return W @ W
        Q = W.mT @ W
        return 0.5 * (Q + Q.mT)

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        """(A + ΣUUᵀ)X exactly, from the kept matrix and rank-update blocks (no jitter).

        Used for residuals of iterative refinement; needs ``keep_matrix=True``.
        """
        if self._A is None:
            raise RuntimeError(f"{self.name}: the matrix was not kept (keep_matrix=False); matmul is unavailable")
        out = self._A.to(X.dtype) @ X
        for U in self._updates:
            U = U.to(X.dtype)
            out = out + U @ (U.mT @ X)
        return out

    @property
    def has_matrix(self) -> bool:
        return self._A is not None

    def matrix(self) -> torch.Tensor:
        """The matrix this factor represents, including jitter: the kept A (+ updates), else L Lᵀ."""
        if self._A is None:
            return self.L @ self.L.mT
        M = self._A.to(self.dtype).clone()
        for U in self._updates:
            M.addmm_(U.to(self.dtype), U.to(self.dtype).mT)
        if self.jitter:
            M.diagonal().add_(self.jitter)
        return M

    # -------------------------------------------------------------------------- diagnostics
    @property
    def cond_estimate(self) -> float:
        """2-norm condition number of the factored matrix, estimated in O(n²) per step.

        Power iteration for λ_max (through L Lᵀ) and inverse iteration for λ_min (through the
        factor), 6 block steps each from a fixed random start: a lower bound that is tight when the
        extreme eigenvalues are separated, and costs a few percent of the factorization.
        """
        if self._cond is None:
            self._cond = _cond_estimate(self.L)
        return self._cond

    @property
    def pivot_ratio(self) -> float:
        """min/max of the squared pivots diag(L)²: a cheap lower bound on 1/κ."""
        if self.n == 0:
            return 1.0
        p = self.L.diagonal() ** 2
        return float(p.min() / p.max())

    def logdet(self) -> float:
        return float(2.0 * torch.log(self.L.diagonal()).sum())

    def __repr__(self) -> str:
        return f"SPDFactor(n={self.n}, dtype={self.dtype}, jitter={self.jitter:.3g}, updates={len(self._updates)})"


def _cholesky(A: torch.Tensor, min_pivot: float) -> tuple[torch.Tensor, int]:
    """cholesky_ex, also failing (at that pivot, 1-based) when a squared pivot falls below
    ``min_pivot`` × the largest: a matrix singular in exact arithmetic often factors in floating
    point with a pivot of pure rounding noise, and the solve then amplifies that noise."""
    L, info = torch.linalg.cholesky_ex(A)
    info = int(info)
    if info == 0 and min_pivot > 0 and A.shape[0] > 0:
        p = L.diagonal() ** 2
        if bool(p.min() < min_pivot * p.max()):
            info = int(p.argmin()) + 1
    return L, info


def _cond_estimate(L: torch.Tensor, steps: int = 6, block: int = 4) -> float:
    n = L.shape[0]
    if n == 0:
        return 1.0
    p = min(block, n)
    gen = torch.Generator(device="cpu").manual_seed(0)
    start = torch.randn(n, 2 * p, generator=gen, dtype=torch.float64).to(device=L.device, dtype=L.dtype)

    def top(apply, V):
        # Subspace iteration on a block of p vectors (one pass over L per step serves all of
        # them: the cost is memory traffic, not flops), then Rayleigh–Ritz: a lower bound on
        # the largest eigenvalue that converges like (λ_{p+1}/λ_1)^steps.
        V = torch.linalg.qr(V).Q
        for _ in range(steps):
            V = torch.linalg.qr(apply(V)).Q
        H = V.mT @ apply(V)
        return float(torch.linalg.eigvalsh(0.5 * (H + H.mT))[-1])

    def a_times(V):
        # Column by column: CPU GEMM with a 4-wide right-hand side is oddly slower (tens of ms
        # at n = 1536) than four matrix-vector products.
        return torch.stack([L @ (L.mT @ v) for v in V.unbind(1)], dim=1)

    def a_inv_times(V):
        Y = torch.linalg.solve_triangular(L, V, upper=False)
        return torch.linalg.solve_triangular(L.mT, Y, upper=True)

    lam_max = top(a_times, start[:, :p])
    inv_max = top(a_inv_times, start[:, p:])
    if not (math.isfinite(lam_max) and math.isfinite(inv_max)) or lam_max <= 0 or inv_max <= 0:
        return math.inf
    return lam_max * inv_max


# ----------------------------------------------------------------------------- rank update
def rank_update(factor: SPDFactor, K: torch.Tensor, *, block: int | None = None) -> SPDFactor:
    """The factor of A + K Kᵀ (K is [n, k]) from the factor of A, in O(n²k); input untouched.

    Blocked orthogonal update: with M = [L | K], A + KKᵀ = M Mᵀ, and an LQ factorisation of
    each block row of M, taken left to right, turns M into [L' | 0]. Per block of ``nb`` rows
    the work is one QR of an (nb+k)×nb panel and one (m)×(nb+k)² product on the rows below,
    Σ ≈ n²(nb+k)²/(2·nb) flops: 2n²k at nb = k. When k is so large that refactoring
    (≈ n³/3 + n²k) is cheaper, it refactors instead. The jitter of ``factor`` carries over.
    """
    if not isinstance(factor, SPDFactor):
        raise TypeError(f"rank_update: factor must be an SPDFactor, got {type(factor).__name__}")
    if not isinstance(K, torch.Tensor):
        raise TypeError(f"rank_update: K must be a torch.Tensor, got {type(K).__name__}")
    if K.ndim == 1:
        K = K.unsqueeze(1)
    if K.ndim != 2 or K.shape[0] != factor.n:
        raise ValueError(f"rank_update: K must be [{factor.n}, k] to update a {factor.n}x{factor.n} factor, "
                         f"got {tuple(K.shape)}")
    if K.device != factor.device:
        raise ValueError(f"rank_update: K is on {K.device}, the factor on {factor.device}")
    _finite_or_raise("rank_update K", K)
    n, k = factor.n, K.shape[1]
    Kd = K.to(factor.dtype)
    updates = [*factor._updates, K]
    if k == 0 or n == 0:
        return SPDFactor._from_factor(factor.L.clone(), jitter=factor.jitter, A=factor._A, updates=updates,
                                      name=factor.name)
    nb = block or max(16, min(k, 256))
    qr_cost = n * n * (nb + k) ** 2 / (2 * nb)
    refactor_cost = n**3 + n * n * k  # L Lᵀ (or a kept A) plus KKᵀ, then n³/3
    if qr_cost > refactor_cost:
        M = factor.L @ factor.L.mT
        M.addmm_(Kd, Kd.mT)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:  # cannot happen for an SPD A, but rounding must not pass silently
            raise NotSPDError(f"rank_update: refactoring {factor.name} + KKᵀ failed at pivot {int(info)}")
        return SPDFactor._from_factor(L, jitter=factor.jitter, A=factor._A, updates=updates, name=factor.name)

    L = factor.L.clone()
    W = Kd.clone()  # the part of the low-rank block still to be absorbed, rows below the panel
    for s in range(0, n, nb):
        e = min(s + nb, n)
        b = e - s
        panel = torch.cat([L[s:e, s:e], W[s:e]], dim=1)  # [b, b+k]; its LQ gives the new diagonal block
        Q, Rf = torch.linalg.qr(panel.mT, mode="complete")  # panel = Rfᵀ Qᵀ
        # Cholesky factors have a positive diagonal; flip the signs QR left negative.
        sign = torch.sign(Rf.diagonal())
        sign[sign == 0] = 1
        Q[:, :b] *= sign
        L[s:e, s:e] = (Rf[:b].mT * sign).tril()
        if e < n:
            rest = torch.cat([L[e:, s:e], W[e:]], dim=1) @ Q  # [m, b+k]
            L[e:, s:e] = rest[:, :b]
            W[e:] = rest[:, b:]
    return SPDFactor._from_factor(L, jitter=factor.jitter, A=factor._A, updates=updates, name=factor.name)


