"""AlphaEdit: updates projected onto the null space of the preserved keys (Fang et al., ICLR 2025).

P = U Uᵀ, U the eigenvectors of C0 with eigenvalue below ``nullspace_threshold`` (r = dim U, in
the report as ``extra["nullspace_rank"]``). Per batch with keys K₁ and residuals R, and the keys
K_p of every earlier batch of this Editor's sequence, the authors solve a d×d general system,

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹        (α: ``l2``, the authors' L2).

Since P = U Uᵀ with UᵀU = I, Uᵀ(A P + αI)⁻¹ = (UᵀAU + αI_r)⁻¹ Uᵀ for any A, so

    Δ = R (U Z)ᵀ,  Z = S⁻¹ (UᵀK₁),  S = α I_r + Σ_p (UᵀK_p)(UᵀK_p)ᵀ + (UᵀK₁)(UᵀK₁)ᵀ,

an r×r SPD system: Cholesky, no d×d LU and no d×d product. The factor of S_p (the earlier
batches' part) is kept between batches in the Editor's cache, keyed by the state it was built
from; a batch solves on it through Woodbury (an E×E Cholesky) and leaves the factor of S for the
next one (one r×r Cholesky, r³/3, against the reference's 2d³ product and 2d³/3 LU per batch). The eigendecomposition comes once per layer from
:mod:`pmedit.projection` (cached on disk beside the statistics).

Sequences: K_p lives in ``ctx.state`` (``alphaedit.keys.L<layer>``, [d, N] fp64), so it is
committed only with its batch, travels in deltas files, and a new Editor or ``restore()`` starts
with none (the authors' script keeps it in a variable shared by everything it edits).
``keep_prior_edits=False`` drops K_p (each batch projected alone). λ (``lam``) plays no part:
the projection replaces the λ·C0 term. The spread over several layers is MEMIT's (R/(L−i), z at
the last layer), each layer with its own projector and K_p.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from pmedit.hparams import EditHparams
from pmedit.methods.base import EditContext, Method
from pmedit.methods.memit import spread_edit
from pmedit.projection import load_or_compute_eigh, null_space_basis, stats_root
from pmkernels.solve import SPDFactor

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AlphaEditHparams(EditHparams):
    """``nullspace_threshold``: eigenvalues of C0 below it span the kept space (the authors' fixed
    threshold on the covariance spectrum); ``l2``: α, the ridge of the r×r system."""

    method: str = "alphaedit"
    nullspace_threshold: float = 2e-2
    l2: float = 10.0
    keep_prior_edits: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("nullspace_threshold", "l2"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"EditHparams field {name!r}: must be a finite number > 0, got {v!r}")
        if self.precision != "fp64":
            raise ValueError("EditHparams field 'precision': AlphaEdit solves its r×r system in fp64 "
                             f"(an O(r²E) step where fp32 would save nothing), got {self.precision!r}")


def state_key(layer: int) -> str:
    return f"alphaedit.keys.L{layer}"


def null_space(ctx: EditContext, layer: int) -> torch.Tensor:
    """U [d, r] of ``layer`` for this Editor's threshold, from the Editor's cache or the disk cache."""
    hp = ctx.hparams
    ck = ("alphaedit.U", layer, hp.nullspace_threshold)
    if ck not in ctx.cache:
        eig = ctx.cache.get(("alphaedit.eigh", layer))
        if eig is None:
            eig = load_or_compute_eigh(ctx.second_moment(layer), layer=layer, fingerprint=ctx.spec.fingerprint,
                                       root=stats_root(ctx.cache_dir))
            ctx.cache[("alphaedit.eigh", layer)] = eig
        ctx.cache[ck] = null_space_basis(eig, hp.nullspace_threshold, what=f"{ctx.where}, layer {layer} (AlphaEdit)")
    return ctx.cache[ck]


@dataclass
class Prior:
    """S_p = α I_r + Σ_p (UᵀK_p)(UᵀK_p)ᵀ (fp64 [r, r]) and its Cholesky factor."""

    S: torch.Tensor
    factor: SPDFactor

    @classmethod
    def from_keys(cls, U: torch.Tensor, Kp: torch.Tensor | None, l2: float) -> Prior:
        r = U.shape[1]
        S = torch.zeros(r, r, dtype=U.dtype, device=U.device)
        if Kp is not None and Kp.numel():
            Ku = U.mT @ Kp.to(U.dtype)
            S.addmm_(Ku, Ku.mT)
        S.diagonal().add_(l2)
        return cls(S, SPDFactor(S, name="αI + Σ(UᵀK_p)(UᵀK_p)ᵀ"))


def prior_for(ctx: EditContext, layer: int, U: torch.Tensor) -> Prior:
    """The S_p of the K_p in ``ctx.state`` now.

    Reused from the Editor's cache when it was built from this very state tensor (the batch that
    made it completed); rebuilt otherwise (first batch, after restore, a loaded sequence, a
    failed batch), so it can never hold keys the state does not.
    """
    Kp = ctx.state.get(state_key(layer)) if ctx.hparams.keep_prior_edits else None
    hit = ctx.cache.get(("alphaedit.S", layer))
    if hit is not None and hit[0] is Kp and hit[1].S.shape[0] == U.shape[1]:
        return hit[1]
    return Prior.from_keys(U, Kp, ctx.hparams.l2)


def alphaedit_delta(R: torch.Tensor, K: torch.Tensor, U: torch.Tensor, prior: Prior, *, update: bool = True):
    """(Δ [d_out, d], the Prior with this batch's keys added (None unless ``update``), relative
    residual of S Z = UᵀK on its first 8 columns).

    R [d_out, E], K [d, E], U [d, r]. S = S_p + Ku Kuᵀ is solved on the factor of S_p that is
    already there (Woodbury: S⁻¹Ku = Y (I + KuᵀY)⁻¹ with Y = S_p⁻¹Ku, an E×E Cholesky), so the
    batch itself needs no r×r factorisation; S's factor, one r×r Cholesky, is made for the next.
    """
    Ku = U.mT @ K  # [r, E]
    Y = prior.factor.solve(Ku)
    G = Ku.mT @ Y
    G = 0.5 * (G + G.mT)
    G.diagonal().add_(1.0)
    Z = SPDFactor(G, check=False, name="I + KuᵀS_p⁻¹Ku").solve(Y.mT.contiguous()).mT  # [r, E]
    S = prior.S.addmm(Ku, Ku.mT)
    c = slice(0, min(Ku.shape[1], 8))  # the residual of a few columns: a check, not r²E more work
    res = float((S @ Z[:, c] - Ku[:, c]).norm() / Ku[:, c].norm().clamp_min(1e-300))
    nxt = Prior(S, SPDFactor(S, check=False, name="αI + Σ(UᵀK)(UᵀK)ᵀ")) if update else None
    return R @ (U @ Z).mT, nxt, res


def edit_batch(ctx: EditContext, reqs: list) -> None:
    hp, rep = ctx.hparams, ctx.report
    # Every projector before any value optimisation: a threshold that keeps nothing fails here.
    Us = {layer: null_space(ctx, layer) for layer in ctx.layers}
    rep.extra["nullspace_rank"] = {str(layer): int(U.shape[1]) for layer, U in Us.items()}
    solved = {}

    def solve(layer, R, K):
        U = Us[layer]
        t0 = time.perf_counter()
        prior = prior_for(ctx, layer, U)
        try:
            delta, S, res = alphaedit_delta(R, K, U, prior, update=hp.keep_prior_edits)
        except ValueError as e:
            raise ValueError(f"{ctx.where}, layer {layer}: {e}") from e
        rep.seconds_solve += time.perf_counter() - t0
        rep.jitter[layer] = max(rep.jitter.get(layer, 0.0), float(prior.factor.jitter),
                                float(S.factor.jitter) if S is not None else 0.0)
        rep.residuals[layer] = max(rep.residuals.get(layer, 0.0), res)
        solved[layer] = S
        return delta

    def keep(layer, K):
        old = ctx.state.get(state_key(layer))
        Kp = K if old is None else torch.cat([old.to(torch.float64), K], dim=1)
        ctx.state[state_key(layer)] = Kp
        ctx.cache[("alphaedit.S", layer)] = (Kp, solved[layer])  # valid once the batch commits ctx.state

    spread_edit(ctx, reqs, solve=solve, keep=keep)
    log.info("AlphaEdit %s: null-space rank %s", ctx.where, rep.extra["nullspace_rank"])


METHOD = Method(
    name="alphaedit",
    hparams=AlphaEditHparams,
    edit_batch=edit_batch,
    sweep_field="l2",
    summary="update projected onto C0's null space, earlier batches' keys kept; r×r SPD solve",
    presets={
        # The authors' hparams/AlphaEdit/Llama3-8B.json (their v_weight_decay acts on ‖δ‖/‖h‖²,
        # ours on ‖δ‖²/‖h‖²; their statistics count 100k Wikipedia samples, ours tokens).
        "llama3-8b": {"layers": [4, 5, 6, 7, 8], "lr": 0.1, "steps": 25, "weight_decay": 0.5,
                      "clamp_norm_factor": 0.75, "kl_factor": 0.0625, "nullspace_threshold": 2e-2, "l2": 10.0,
                      "keep_prior_edits": True},
        # SmolLM2: from the sweep in benchmarks/RESULTS.md ("AlphaEdit and ENCORE").
        "smollm2": {"nullspace_threshold": 2e-2, "l2": 10.0, "keep_prior_edits": True},
    },
    uses_preservation=False,
)
