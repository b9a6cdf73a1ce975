"""ROME: one fact at a time, a rank-one equality-constrained update of one layer.

Δ = (v − W₀k) kᵀC⁻¹ / (kᵀC⁻¹k) (Meng et al. 2022). Several requests in one batch go in one
after another, each on the weights the previous one left (and, with ``keep_prior_edits``, each
kept in C for the next).
"""
from __future__ import annotations

from dataclasses import dataclass

from pmedit.hparams import EditHparams
from pmedit.methods.base import EditContext, Method


@dataclass(frozen=True, kw_only=True)
class RomeHparams(EditHparams):
    method: str = "rome"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(f"EditHparams field 'layers': ROME edits exactly one layer, got {list(self.layers)}")


def edit_batch(ctx: EditContext, reqs: list) -> None:
    (layer,) = ctx.layers
    for j, r in enumerate(reqs):
        Z, H = ctx.values([r], layer)
        K = ctx.keys([r], layer)  # [d, 1]
        ctx.write(layer, ctx.solve_rank_one((Z - H).mT, K, layer))
        if ctx.hparams.keep_prior_edits:
            ctx.keep_keys(layer, K)


def solve_groups(ctx: EditContext, K, R, group_size: int) -> list:
    """Independent single edits (groups of one): the equality form with no ridge, kᵀC⁻¹k being
    the 1×1 system, all solved together (a group of several is ROME's sequence, not this)."""
    from pmedit.methods.memit import solve_groups as closed_form_groups

    if group_size != 1:
        raise ValueError(f"rome.solve_groups: ROME solves groups of one edit, got {group_size}")
    return closed_form_groups(ctx, K, R, 1, ridge=0.0)


METHOD = Method(
    name="rome",
    hparams=RomeHparams,
    edit_batch=edit_batch,
    sweep_field="lam",
    summary="rank-one equality update of one layer, one fact at a time",
    solve_groups=solve_groups,
    solve_groups_max=1,
)
