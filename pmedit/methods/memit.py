"""MEMIT: many facts, least squares, spread over one or more layers (Meng et al. 2023).

Δ = R Kᵀ (C + KKᵀ)⁻¹ = R (I + KᵀC⁻¹K)⁻¹ KᵀC⁻¹: the ridge on KᵀC⁻¹K is exactly 1, so MEMIT has
no λₑ field (giving one is an error; use EMMET for another ridge). The preservation weight is
the shared ``lam`` (C = λ·C0).

The spread (also EMMET's): z is optimised at the last edited layer; for layer i of L, keys at
that layer on the current weights, the current output of the last layer at the subject h, and
R = (z − h)/(L − i). Layer i is written before layer i+1's keys are computed, since those keys
depend on it; with one layer this is R = z − h.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pmedit.hparams import EditHparams
from pmedit.methods.base import EditContext, Method


@dataclass(frozen=True, kw_only=True)
class MemitHparams(EditHparams):
    method: str = "memit"


def spread_edit(ctx: EditContext, reqs: list, *, ridge: float = 1.0, solve=None, keep=None,
                value_options: dict | None = None) -> None:
    """Write the spread update of ``reqs`` over ``ctx.layers``.

    Per layer Δ = ``solve(layer, R, K)`` (default: the closed form with ridge ``ridge`` on
    KᵀC⁻¹K), then ``keep(layer, K)`` when ``keep_prior_edits`` is on (default: ``ctx.keep_keys``).
    ``value_options`` go to ``ctx.values`` (a method's own stopping rule).
    """
    if solve is None:
        def solve(layer, R, K):
            return ctx.solve(R, K, layer, ridge=ridge)
    keep = ctx.keep_keys if keep is None else keep
    last = ctx.layers[-1]
    Z, H = ctx.values(reqs, last, **(value_options or {}))
    n = len(ctx.layers)
    for i, layer in enumerate(ctx.layers):
        K = ctx.keys(reqs, layer)
        if i > 0:
            H = ctx.outputs_at_subject(reqs, last)
        R = ((Z - H) / (n - i)).mT
        ctx.write(layer, solve(layer, R, K))
        if ctx.hparams.keep_prior_edits:
            keep(layer, K)


def solve_groups(ctx: EditContext, K: torch.Tensor, R: torch.Tensor, group_size: int, *,
                 ridge: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Factors (U_g, V_g) of Δ_g = R_g (K_gᵀC⁻¹K_g + ρI)⁻¹ K_gᵀC⁻¹ for consecutive groups of
    ``group_size`` columns of K [d, N] and R [d_out, N], on one layer's preservation factor.

    C⁻¹K and L⁻¹K come from one pair of triangular solves over all N keys; the B×B systems of
    all groups go to one ``batched_spd_solve`` call. U_g = (D_g⁻¹R_gᵀ)ᵀ, V_g = C⁻¹K_g. Groups
    with more edits than key dimensions take the dual route of ``ctx.solve`` (dense Δ, factored).
    """
    from pmedit.evaluation.hooks import low_rank_factors
    from pmkernels.batched_solve import batched_spd_solve

    (layer,) = ctx.layers
    fac = ctx.preservation(layer)
    N, B = K.shape[1], group_size
    if B > ctx.d:
        return [low_rank_factors(ctx.solve(R[:, s:s + B], K[:, s:s + B], layer, ridge=ridge), max_rank=B,
                                 what=f"group {s // B}'s update") for s in range(0, N, B)]
    t0 = time.perf_counter()
    Kf = K.to(device=fac.device, dtype=fac.dtype)
    W = fac.whiten(Kf).to(torch.float64)  # L⁻¹K
    CK = fac.solve(Kf).to(torch.float64)  # C⁻¹K
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    jitter = 0.0
    for sizes in ([B] * (N // B), [N % B] if N % B else []):
        if not sizes:
            continue
        b = sizes[0]
        start = len(out) * B
        G = len(sizes)
        Wg = W[:, start:start + G * b].reshape(W.shape[0], G, b).permute(1, 0, 2)  # [G, d, b]
        D = Wg.mT @ Wg
        D = 0.5 * (D + D.mT) + ridge * torch.eye(b, dtype=torch.float64, device=D.device)
        Rg = R[:, start:start + G * b].to(D.device, torch.float64).reshape(R.shape[0], G, b).permute(1, 2, 0)
        sol = batched_spd_solve(D.contiguous(), Rg.contiguous())  # [G, b, d_out] = D⁻¹Rᵀ
        jitter = max(jitter, float(sol.jitter.max()) if sol.jitter.numel() else 0.0)
        for g in range(G):
            s = start + g * b
            out.append((sol.X[g].mT.contiguous(), CK[:, s:s + b].contiguous()))
    rep = ctx.report
    rep.seconds_solve += time.perf_counter() - t0
    rep.jitter[layer] = max(rep.jitter.get(layer, 0.0), fac.jitter, jitter)
    return out


def edit_batch(ctx: EditContext, reqs: list) -> None:
    spread_edit(ctx, reqs, ridge=1.0)


METHOD = Method(
    name="memit",
    hparams=MemitHparams,
    edit_batch=edit_batch,
    sweep_field="lam",
    summary="least-squares batch update (ridge 1 on KᵀC⁻¹K), spread over layers",
    solve_groups=lambda ctx, K, R, group_size: solve_groups(ctx, K, R, group_size, ridge=1.0),
)
