"""The two value objectives ``optimize_values`` offers: pmedit's and the MEMIT/EMMET authors'.

Both optimise δ (added to decoder layer ``l``'s output at the subject's last token of every
rewriting prompt and of the KL prompt ``"{subject} is a"``) with torch.optim.Adam's update and
the norm clamp ‖δ‖ ≤ clamp_norm_factor·‖h‖ after every update; both score target_new as the mean
over rewriting prompts of the per-token mean NLL, at the final layer (final norm + lm_head). They
differ term by term:

========================  ===========================================  ============================================
term                      ``"pmedit"`` (default)                        ``"memit"`` (``compute_z`` of MEMIT/EMMET)
========================  ===========================================  ============================================
KL position               next-token distribution *after* the KL        the KL prompt's subject's last token (where
                          prompt ("… is a" → next word)                 δ is added), as their ``lookup_idxs``
KL direction              KL(unedited ‖ edited) = Σ p₀ (log p₀ − log p)  KL(edited ‖ unedited) = Σ p (log p − log p₀)
                                                                        (``F.kl_div(init, cur, log_target=True)``)
weight decay              weight_decay · ‖δ‖² / ‖h‖²                    weight_decay · ‖δ‖ / ‖h‖²
early stop                NLL < loss_stop                               total loss (NLL + KL + decay) < loss_stop
                                                                        (their hard-coded 5e-2; our loss_stop)
updates for ``steps``     ``steps`` updates, loss evaluated steps + 1   ``steps − 1`` updates, loss evaluated
                          times                                         ``steps`` times (their loop breaks at
                                                                        ``it == v_num_grad_steps − 1``)
loss layer                final layer                                   ``max(v_loss_layer, layer)``; every
                                                                        published Llama/GPT config sets the last
                                                                        layer, so: final layer (other loss layers
                                                                        are not offered)
========================  ===========================================  ============================================

Not part of the objective and the same under both: tokenisation (pmedit.tokens: target ids are
appended as ids, theirs re-tokenise ``prompt + decode(target[:-1])``), the row order (their bare
prompt is the first "template"; h is read there in both), per-edit batching (exact: each edit's
loss is summed, so batch-mates do not interact), ``kl_factor``, ``lr``, Adam's β and ε.

What this module does not do: run the model (pmedit.values does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

OBJECTIVES = ("pmedit", "memit")


@dataclass(frozen=True)
class Objective:
    name: str
    kl_at_subject: bool  # KL read at the KL prompt's subject token (memit) or after the prompt

    def updates(self, steps: int) -> int:
        """Adam updates an edit may get for the ``steps`` setting."""
        return steps if self.name == "pmedit" else max(steps - 1, 0)

    def kl(self, ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """Per-row KL term [rows] from unedited (``ref_logp``) and current log-probs [rows, vocab]."""
        if self.name == "pmedit":
            return (ref_logp.exp() * (ref_logp - logp)).sum(1)
        return (logp.exp() * (logp - ref_logp)).sum(1)

    def decay(self, delta: torch.Tensor, h_sq: torch.Tensor) -> torch.Tensor:
        """Per-edit weight-decay term [E] (before ``weight_decay``) from δ [E, hidden], ‖h‖² [E]."""
        if self.name == "pmedit":
            return delta.pow(2).sum(1) / h_sq
        return delta.norm(dim=1) / h_sq

    def stop_value(self, nll: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """What is compared with ``loss_stop`` (detached)."""
        return nll if self.name == "pmedit" else loss.detach()


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"optimize_values: objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    return Objective(name, kl_at_subject=name == "memit")
