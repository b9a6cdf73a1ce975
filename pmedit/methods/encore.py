"""ENCORE: MEMIT with a norm constraint and most-probable early stopping (Gupta et al. 2025,
"Lifelong Sequential Knowledge Editing without Model Degradation").

Δ = R Kᵀ (C + KKᵀ)⁻¹ with C = λ·C0 + μ·I + Σ_p K_p K_pᵀ: MEMIT's closed form (ridge 1 on
KᵀC⁻¹K) whose preservation matrix gains μ·I (``mu``, the authors' ``update_norm_lambda``: the
objective's μ‖Δ‖²_F term, which bounds the growth of the edited matrix over a long sequence) and
the keys of every earlier batch (``keep_prior_edits``, on by default as the authors'
``add_prev_edits``; unscaled by λ, as theirs). The Editor factors λ·C0 + μ·I once per layer and
rank-updates it with each batch's keys. Values stop early by the authors' most-probable rule
(``mpes_steps``, see :mod:`pmedit.values`); the spread over layers is MEMIT's.

The authors' ENCORE config also carries ``emmet_lambda``, which their ENCORE update never reads;
there is no λₑ here (EMMET with μ is not what they published).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pmedit.hparams import EditHparams
from pmedit.methods.base import EditContext, Method
from pmedit.methods.memit import spread_edit


@dataclass(frozen=True, kw_only=True)
class EncoreHparams(EditHparams):
    """``mu``: μ ≥ 0 in C = λ·C0 + μ·I; ``mpes_steps``: stop an edit's value optimisation at the
    m-th evaluation where target_new is the argmax under every rewriting prompt (0: off)."""

    method: str = "encore"
    mu: float = 10.0
    mpes_steps: int = 2
    keep_prior_edits: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"EditHparams field 'mu': must be a finite number >= 0 (the weight of the norm "
                             f"constraint μ‖Δ‖²), got {self.mu!r}")
        if self.mpes_steps < 0:
            raise ValueError(f"EditHparams field 'mpes_steps': must be >= 0 (0 turns most-probable early "
                             f"stopping off), got {self.mpes_steps!r}")


def preservation_matrix(hp: EncoreHparams, C0: torch.Tensor) -> torch.Tensor:
    C = hp.lam * C0.to(torch.float64)
    C.diagonal().add_(hp.mu)
    return C


def edit_batch(ctx: EditContext, reqs: list) -> None:
    """MEMIT's spread (pmedit.methods.memit.spread_edit), values with ENCORE's stopping rule."""
    spread_edit(ctx, reqs, ridge=1.0, value_options={"mpes_steps": ctx.hparams.mpes_steps})


METHOD = Method(
    name="encore",
    hparams=EncoreHparams,
    edit_batch=edit_batch,
    sweep_field="mu",
    summary="MEMIT with a norm constraint μ·I and earlier edits' keys in C, most-probable early stopping",
    presets={
        # The authors' hparams/ENCORE/llama3-8b.json: prob_cutoff −2, update_norm_lambda 20,
        # mom2_update_weight 15000 (their v_weight_decay acts on ‖δ‖/‖h‖², ours on ‖δ‖²/‖h‖²;
        # their statistics count 10k Wikipedia samples, ours tokens).
        "llama3-8b": {"layers": [4, 5, 6, 7, 8], "lr": 0.5, "steps": 25, "weight_decay": 0.5,
                      "clamp_norm_factor": 0.75, "kl_factor": 0.0625, "lam": 15000.0, "mu": 20.0, "mpes_steps": 2,
                      "keep_prior_edits": True},
        # SmolLM2: from the sweep in benchmarks/RESULTS.md ("AlphaEdit and ENCORE").
        "smollm2": {"mu": 10.0, "mpes_steps": 2, "keep_prior_edits": True},
    },
    preservation_matrix=preservation_matrix,
)
