"""EMMET: many facts with equality constraints, ridge λₑ on KᵀC⁻¹K (Gupta et al. 2024).

Δ = R (KᵀC⁻¹K + λₑI)⁻¹ KᵀC⁻¹, spread over layers like MEMIT. λₑ = 0 is the pure equality form
and exists only while a batch has no more edits than key dimensions (KᵀC⁻¹K is E×E of rank
≤ d); that is checked before any value optimisation runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pmedit.hparams import EditHparams
from pmedit.methods.base import EditContext, Method
from pmedit.methods.memit import solve_groups, spread_edit


@dataclass(frozen=True, kw_only=True)
class EmmetHparams(EditHparams):
    """``lam_e``: the ridge λₑ on KᵀC⁻¹K (needed whenever a batch has more edits than d)."""

    method: str = "emmet"
    lam_e: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.lam_e) and self.lam_e >= 0):
            raise ValueError(f"EditHparams field 'lam_e': must be a finite number >= 0, got {self.lam_e!r}")


def check_batch(hp: EmmetHparams, n_edits: int, d: int) -> None:
    if hp.lam_e == 0 and n_edits > d:
        raise ValueError(
            f"EMMET with lam_e=0 needs at most d={d} edits per batch (KᵀC⁻¹K is {n_edits}x{n_edits} of rank "
            f"<= {d}, so the equality-constrained update does not exist); set lam_e > 0 or a smaller batch_size"
        )


def edit_batch(ctx: EditContext, reqs: list) -> None:
    spread_edit(ctx, reqs, ridge=ctx.hparams.lam_e)


METHOD = Method(
    name="emmet",
    hparams=EmmetHparams,
    edit_batch=edit_batch,
    sweep_field="lam_e",
    summary="equality-constrained batch update with ridge λₑ, spread over layers",
    presets={"smollm2": {"lam_e": 0.1}, "llama3-8b": {"lam_e": 0.1}},
    check_batch=check_batch,
    solve_groups=lambda ctx, K, R, group_size: solve_groups(ctx, K, R, group_size, ridge=ctx.hparams.lam_e),
)
