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

from dataclasses import dataclass

from pmedit.hparams import EditHparams
from pmedit.methods.base import EditContext, Method


@dataclass(frozen=True, kw_only=True)
class MemitHparams(EditHparams):
    method: str = "memit"


def spread_edit(ctx: EditContext, reqs: list, *, ridge: float) -> None:
    """Write the spread update of ``reqs`` over ``ctx.layers`` with ridge ``ridge`` on KᵀC⁻¹K."""
    last = ctx.layers[-1]
    Z, H = ctx.values(reqs, last)
    n = len(ctx.layers)
    for i, layer in enumerate(ctx.layers):
        K = ctx.keys(reqs, layer)
        if i > 0:
            H = ctx.outputs_at_subject(reqs, last)
        R = ((Z - H) / (n - i)).mT
        ctx.write(layer, ctx.solve(R, K, layer, ridge=ridge))
        if ctx.hparams.keep_prior_edits:
            ctx.keep_keys(layer, K)


def edit_batch(ctx: EditContext, reqs: list) -> None:
    spread_edit(ctx, reqs, ridge=1.0)


METHOD = Method(
    name="memit",
    hparams=MemitHparams,
    edit_batch=edit_batch,
    sweep_field="lam",
    summary="least-squares batch update (ridge 1 on KᵀC⁻¹K), spread over layers",
)
