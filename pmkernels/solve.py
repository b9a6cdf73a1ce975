"""Cholesky-based solves for the preservation–memorization closed forms (ROME, MEMIT, EMMET).

The three editors are linear algebra over one symmetric positive-definite (SPD) preservation
matrix C = λ·C0 (d×d). The research code inverts C explicitly in fp64 for every batch and then
inverts D = KᵀC⁻¹K, with a pinv fallback and no checks. Here C is factored once (Cholesky,
with bounded relative jitter when it is numerically semidefinite), the factor is reused across
batches and updated in O(d²k) when edits join the preservation term, and every quantity of the
form KᵀC⁻¹K comes from the whitened keys L⁻¹K, never from C⁻¹.

All three methods are one formula with a ridge ρ on KᵀC⁻¹K,
Δ = R (KᵀC⁻¹K + ρI)⁻¹ KᵀC⁻¹ = R Kᵀ (KKᵀ + ρC)⁻¹: EMMET is ρ = λₑ, MEMIT ρ = 1 and ROME one edit
with ρ = 0. The ridge is always the caller's explicit argument (no method names here: which ρ a
method uses is pmedit.methods' business). ``pm_delta`` evaluates the formula in the
E-dimensional "key space" when E ≤ d (factor C, solve an E×E system) and in the d-dimensional
"dual" form when E > d (factor KKᵀ + ρC), which is far cheaper there and is the only form that
exists when KᵀC⁻¹K is singular. ``rank_one_delta`` is the textbook one-edit form
(v − W₀k) kᵀC⁻¹ / (kᵀC⁻¹k), kept separate so that "ρ = 0 with one edit equals it" is a check.

What this module deliberately does not do: collect C0 (``pmkernels.covariance``), compute keys
or values (``pmedit``), or batch many small systems (``pmkernels.batched_solve``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from pmkernels.spd import NotSPDError, SPDFactor, _check_square, _finite_or_raise, rank_update

log = logging.getLogger(__name__)

__all__ = ["SPDFactor", "NotSPDError", "rank_update", "pm_delta", "rank_one_delta", "DeltaResult"]


# ----------------------------------------------------------------------- the closed forms
@dataclass
class DeltaResult:
    """An update Δ [d_out, d] (fp64) with the numbers that say how far to trust it.

    ``residual``: relative Frobenius residual of the linear system that defines Δ on the route
    taken, in fp64: ‖ΔK + ρΛ − R‖/‖R‖ in key space (Λ = R(KᵀC⁻¹K+ρI)⁻¹; for ρ = 0 this is
    exactly ‖(W₀+Δ)K − V‖/‖V − W₀K‖), and with fp32 refinement also ‖CZ − K‖/‖K‖ for the
    refined Z = C⁻¹K (the larger of the two; both in ``extra``); ‖Δ(KKᵀ+ρC) − RKᵀ‖/‖RKᵀ‖ in
    the dual form.
    ``jitter`` / ``cond_estimate`` belong to the big d×d factor (C or KKᵀ+ρC),
    ``inner_jitter`` to the E×E matrix KᵀC⁻¹K + ρI (key space only). ``route`` is "keys",
    "dual", "rank-one" or "empty".
    """

    delta: torch.Tensor
    residual: float
    jitter: float
    route: str = "keys"
    precision: str = "fp64"
    inner_jitter: float = 0.0
    refine_steps: int = 0
    extra: dict = field(default_factory=dict)
    _factor: SPDFactor | None = field(default=None, repr=False, compare=False)
    _cond: float | None = field(default=None, repr=False, compare=False)

    @property
    def cond_estimate(self) -> float:
        """κ₂ estimate of the d×d factor, computed on first access (a diagnostic that costs a
        dozen passes over L, so callers that never look do not pay); the reference to the
        factor is dropped once it is known, so the result no longer keeps L alive."""
        if self._cond is None:
            self._cond = self._factor.cond_estimate if self._factor is not None else math.nan
            self._factor = None
        return self._cond


def _refined_solve(matmul64, factor32: SPDFactor, B: torch.Tensor, *, max_steps: int, what: str):
    """Mixed-precision iterative refinement: fp32 factor, fp64 residuals, fp64 accumulation.

    Converges to the fp64 solution while κ(A)·u32 < 1 (κ up to ~1e6); past that it stagnates,
    which is detected and reported rather than hidden.
    """
    bnorm = float(B.norm())
    if bnorm == 0:
        return torch.zeros_like(B), 0.0, 0
    X = factor32.solve(B.to(torch.float32)).to(torch.float64)
    best, best_res, steps = X, math.inf, 0
    floor = 8 * torch.finfo(torch.float64).eps
    for step in range(max_steps + 1):
        Rr = B - matmul64(X)
        res = float(Rr.norm()) / bnorm
        if res < best_res:
            best, best_res, steps = X, res, step
        elif res > 0.5 * best_res:
            break  # stagnated: more steps only add rounding
        if res <= floor or step == max_steps:
            break
        scale = float(Rr.abs().max())  # keep the correction inside fp32's range
        X = X + factor32.solve((Rr / scale).to(torch.float32)).to(torch.float64) * scale
    if best_res > 1e-10:
        log.warning("%s: fp32 iterative refinement stopped at relative residual %.2e after %d steps "
                    "(the matrix is too ill-conditioned for fp32; use precision='fp64')", what, best_res, steps)
    return best, best_res, steps


def pm_delta(
    R: torch.Tensor,
    K: torch.Tensor,
    C: torch.Tensor | SPDFactor,
    *,
    lam: float = 1.0,
    ridge: float = 0.0,
    precision: str = "fp64",
    route: str = "auto",
    max_refine: int = 10,
) -> DeltaResult:
    """Δ = R (KᵀC⁻¹K + ridge·I)⁻¹ KᵀC⁻¹ [d_out, d] from residuals R [d_out, E] and keys K [d, E].

    ``C`` is C0 [d, d] (the preservation matrix is then ``lam * C0``) or an ``SPDFactor`` of the
    full preservation matrix, λ already applied (``lam`` must then stay 1): factor once, pass the
    factor for every batch. ``ridge`` ≥ 0 is the caller's choice (EMMET: λₑ; MEMIT: 1; an
    equality-constrained update: 0, which needs E ≤ d). ``precision="fp32"`` factors in fp32
    and refines every solve with fp64 residuals (needs the matrix, so a factor must keep it).
    ``route``: "keys" (E×E system; needs C factored), "dual" (factor KKᵀ + ridge·C; needs
    ridge > 0) or "auto" (keys when E ≤ d).
    """
    d_out, E, d, device, lam = _check_delta_args(R, K, C, lam=lam, ridge=ridge, precision=precision, route=route)
    le = float(ridge)
    if E > d and le == 0:
        raise ValueError(
            f"pm_delta: E={E} edits > d={d} with ridge=0: KᵀC⁻¹K ({E}x{E}) has rank at most {d} and is "
            f"singular, so the equality-constrained update does not exist; pass ridge > 0"
        )
    if E == 0:
        return DeltaResult(torch.zeros(d_out, d, dtype=torch.float64, device=device), 0.0, 0.0,
                           route="empty", precision=precision)
    if route == "auto":
        route = "keys" if E <= d or le == 0 else "dual"
    if route == "dual" and le == 0:
        raise ValueError("pm_delta: route='dual' needs ridge > 0 (KKᵀ alone is singular for E < d)")
    R64, K64 = R.to(torch.float64), K.to(torch.float64)
    P, Pfac, fdtype = _preservation(C, lam, precision, need_matrix=route == "dual")
    if route == "keys":
        return _keys_route(False, R64, K64, P, Pfac, le, fdtype, max_refine)
    return _dual_route(R64, K64, P, le, fdtype, max_refine)


def rank_one_delta(
    R: torch.Tensor,
    K: torch.Tensor,
    C: torch.Tensor | SPDFactor,
    *,
    lam: float = 1.0,
    precision: str = "fp64",
) -> DeltaResult:
    """The textbook one-edit update Δ = r (C⁻¹k)ᵀ / (kᵀC⁻¹k), R [d_out, 1], K [d, 1] (ROME).

    Arguments as :func:`pm_delta`; equal to ``pm_delta(R, K, C, ridge=0)`` up to rounding.
    """
    d_out, E, d, device, lam = _check_delta_args(R, K, C, lam=lam, ridge=0.0, precision=precision, route="keys")
    if E != 1:
        raise ValueError(f"rank_one_delta: one edit at a time (K is [d, 1]); got E={E}")
    P, Pfac, fdtype = _preservation(C, lam, precision, need_matrix=False)
    return _keys_route(True, R.to(torch.float64), K.to(torch.float64), P, Pfac, 0.0, fdtype, 10)


def _check_delta_args(R, K, C, *, lam, ridge, precision, route):
    if precision not in ("fp64", "fp32"):
        raise ValueError(f"pm_delta: precision must be 'fp64' or 'fp32', got {precision!r}")
    if route not in ("auto", "keys", "dual"):
        raise ValueError(f"pm_delta: route must be 'auto', 'keys' or 'dual', got {route!r}")
    for nm, t in (("R", R), ("K", K)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pm_delta: {nm} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"pm_delta: {nm} must be 2-D, got shape {tuple(t.shape)}")
    d_out, E = R.shape
    d = K.shape[0]
    if K.shape[1] != E:
        raise ValueError(f"pm_delta: R is [d_out={d_out}, E={E}] but K is [d={d}, E={K.shape[1]}]: edit counts differ")
    if isinstance(C, SPDFactor):
        if C.n != d:
            raise ValueError(f"pm_delta: K has d={d} rows but the factor of C is {C.n}x{C.n}")
        if lam != 1.0:
            # A silently ignored λ would edit with the wrong preservation strength.
            raise ValueError(f"pm_delta: lam={lam} given with an SPDFactor; the factor is of the full preservation "
                             f"matrix (λ already applied): factor lam * C0 instead")
        device = C.device
    elif isinstance(C, torch.Tensor):
        _check_square("C", C)
        if C.shape[0] != d:
            raise ValueError(f"pm_delta: K has d={d} rows but C is {tuple(C.shape)}")
        device = C.device
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"pm_delta: lam must be a positive finite number, got {lam}")
    else:
        raise TypeError(f"pm_delta: C must be a tensor (C0) or an SPDFactor, got {type(C).__name__}")
    for nm, t in (("R", R), ("K", K)):
        if t.device != device:
            raise ValueError(f"pm_delta: {nm} is on {t.device} but C is on {device}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"pm_delta: ridge must be a finite number >= 0, got {ridge!r}")
    _finite_or_raise("R", R)
    _finite_or_raise("K", K)
    if precision == "fp32" and isinstance(C, SPDFactor) and not C.has_matrix:
        raise ValueError("pm_delta: precision='fp32' refines against the matrix itself; the factor was "
                         "built with keep_matrix=False")
    return d_out, E, d, device, lam


def _preservation(C, lam, precision, *, need_matrix):
    """(P, Pfac, fdtype): the preservation matrix where the route needs it, and its fp64 factor
    when that can be reused as given."""
    fdtype = torch.float32 if precision == "fp32" else torch.float64
    if isinstance(C, SPDFactor):
        # The matrix itself is only needed to refine (fp32) or to form KKᵀ + ρC (dual).
        P = C.matrix().to(torch.float64) if (precision == "fp32" or need_matrix) else None
        Pfac = C if (precision == "fp64" and not need_matrix) else None
    else:
        P = float(lam) * C.to(torch.float64)  # a new tensor: C is never modified
        Pfac = None
    return P, Pfac, fdtype


def _keys_route(rank_one, R, K, P, Pfac, le, fdtype, max_refine) -> DeltaResult:
    d_out, E = R.shape
    steps, c_res = 0, 0.0
    if fdtype == torch.float64:
        fac = Pfac if Pfac is not None else SPDFactor(P, name="C", check=True)
        Lf = fac.L.to(torch.float64)
        W = torch.linalg.solve_triangular(Lf, K, upper=False)  # L⁻¹K (K already checked)
        D = W.mT @ W
        Z = torch.linalg.solve_triangular(Lf.mT, W, upper=True)  # C⁻¹K = L⁻ᵀ L⁻¹ K
    else:
        fac = SPDFactor(P, dtype=torch.float32, name="C", check=True)
        Z, c_res, steps = _refined_solve(lambda X: P @ X, fac, K, max_steps=max_refine, what="C⁻¹K")
        D = K.mT @ Z
    if rank_one:
        # The textbook form, kept separate so that "one-edit ridge 0 equals it" is a real check.
        q = float(D[0, 0])
        if not q > 0:
            raise NotSPDError(f"pm_delta: kᵀC⁻¹k = {q:.3g} is not positive (k is zero or C is not SPD)")
        Y = R.mT / q
        inner_jit = 0.0
    else:
        D = 0.5 * (D + D.mT)
        if le:
            D.diagonal().add_(le)
        # A squared pivot below 100·E·u of the largest is rounding noise (κ(D) beyond what fp64
        # resolves, e.g. the same key twice): treat it as singular and let jitter regularise it.
        Dfac = SPDFactor(D, name="KᵀC⁻¹K + ρI" if le else "KᵀC⁻¹K", check=False,
                         min_pivot=100 * E * torch.finfo(torch.float64).eps)
        if Dfac.jitter:
            log.warning("pm_delta(ridge=%g): KᵀC⁻¹K + ρI (%dx%d) needed jitter %.3g: the keys are (nearly) linearly "
                        "dependent; the constraints hold only approximately", le, E, E, Dfac.jitter)
        Y = Dfac.solve(R.mT.contiguous())  # [E, d_out] = D⁻¹Rᵀ
        inner_jit = Dfac.jitter
    # ΔK + λₑΛ = R (Λ = Yᵀ) is the constraint block of the optimality system; with ΔC = ΛKᵀ,
    # which Δ = ΛKᵀC⁻¹ satisfies by construction, it characterises Δ. When D is ill-conditioned
    # (κ(C) ~ 1e12) the computed KᵀZ and D disagree by ~κ·u and the constraints slip; since
    # Δ is linear in R, refining Y on the constraint residual (an E×E solve and two d×E
    # products per step, no d×d work) restores them.
    rn = float(R.norm())
    constraint, best, prev = math.inf, None, math.inf
    for it in range(3):
        delta = Y.mT @ Z.mT  # [d_out, d], contiguous: BLAS takes the transposes for free
        res_mat = delta @ K - R  # the achieved residual, from Δ itself
        if le:
            res_mat = res_mat + le * Y.mT
        r = float(res_mat.norm()) / rn if rn > 0 else float(res_mat.norm())
        if r < constraint:
            constraint, best = r, delta
        # 1e-14 relative is below anything an edit can resolve: most calls stop here at once,
        # and only ill-conditioned ones pay for another pass.
        if rank_one or r <= 1e-14 or r > 0.5 * prev or it == 2:
            break
        prev = r
        Y = Y - Dfac.solve(res_mat.mT.contiguous())
    delta = best
    extra = {"constraint_residual": constraint}
    if fdtype == torch.float32:
        # With λₑ = 0 the constraints hold whatever Z's accuracy (D is built from the same Z),
        # so the refined solve's own residual must be part of the figure.
        extra["c_solve_residual"] = c_res
    return DeltaResult(delta.contiguous(), max(constraint, c_res), fac.jitter,
                       route="rank-one" if rank_one else "keys", precision="fp64" if fdtype == torch.float64 else "fp32",
                       inner_jitter=inner_jit, refine_steps=steps, extra=extra, _factor=fac)


def _dual_route(R, K, P, le, fdtype, max_refine) -> DeltaResult:
    M = torch.addmm(P, K, K.mT, beta=le)  # KKᵀ + ρC
    M = 0.5 * (M + M.mT)
    B = K @ R.mT  # [d, d_out] = K Rᵀ
    steps = 0
    if fdtype == torch.float64:
        fac = SPDFactor(M, name="KKᵀ + ρC", check=False)
        X = fac.solve(B)
    else:
        fac = SPDFactor(M, dtype=torch.float32, name="KKᵀ + ρC", check=False)
        X, _, steps = _refined_solve(lambda Y: M @ Y, fac, B, max_steps=max_refine, what="(KKᵀ+ρC)⁻¹KRᵀ")
    bn = float(B.norm())
    rr = float((M @ X - B).norm())
    residual = rr / bn if bn > 0 else rr
    return DeltaResult(X.mT.contiguous(), residual, fac.jitter, route="dual",
                       precision="fp64" if fdtype == torch.float64 else "fp32", refine_steps=steps, _factor=fac)
