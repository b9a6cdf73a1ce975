"""Many independent batch edits of one model, solved together, applied by no one.

The batch experiment at batch size B edits N records as N/B independent batches, each on the
unedited model, and scores every record under its own batch's update. Editing, scoring and
restoring N/B times would repeat the keys and values of every record and copy the weights per
batch. Here all N keys and values are computed once (through the Editor's context, so a value
store serves them), the N/B closed forms go to the method's ``solve_groups`` (MEMIT and EMMET
solve their B×B systems in one ``pmkernels.batched_spd_solve`` call), and each update comes back
as low-rank factors U_g V_gᵀ for :class:`pmedit.evaluation.GroupDeltas`. A method without
``solve_groups`` is edited group by group (``Editor.edit`` then ``restore``) and its dense
updates factored; either way group g's factors equal what editing that batch alone writes.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from pmedit.report import BatchReport


@dataclass
class GroupUpdates:
    """Per-group factors (U [d_out, r], V [d, r]) of ``layer``'s update, in request order:
    group g holds requests g·B … (g+1)·B − 1 (the last may be shorter)."""

    layer: int
    group_size: int
    factors: list[tuple[torch.Tensor, torch.Tensor]]
    report: BatchReport
    key_energy: dict = field(default_factory=dict)  # kck_mean / kck_median (see key_energy)

    def group_of(self, n_requests: int) -> list[int]:
        return [i // self.group_size for i in range(n_requests)]


def independent_updates(editor, requests: Iterable[Any], group_size: int) -> GroupUpdates:
    """The updates of editing each consecutive group of ``group_size`` requests alone on the
    Editor's (unedited) model; nothing is written."""
    from pmedit.evaluation.hooks import low_rank_factors
    from pmedit.requests import normalize_requests

    reqs = normalize_requests(requests)
    if not reqs:
        raise ValueError("independent_updates: no requests given")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"independent_updates: group_size must be a positive integer, got {group_size!r}")
    if len(editor.layers) != 1:
        raise ValueError(f"independent_updates: one edited layer, this Editor edits {list(editor.layers)}")
    if editor.n_edits:
        raise ValueError("independent_updates: the Editor holds edits; each group must be solved on the unedited "
                         "model (call restore() first)")
    method, hp, (layer,) = editor.method_impl, editor.hparams, editor.layers
    if method.check_batch is not None:
        method.check_batch(hp, min(group_size, len(reqs)), editor.spec.intermediate_size)
    t0 = time.perf_counter()
    editor.prepare()
    rep = BatchReport(index=0, n_edits=len(reqs), case_ids=[r.case_id for r in reqs], seconds=0.0,
                      value_losses=[], value_steps=[])
    groups = [reqs[s:s + group_size] for s in range(0, len(reqs), group_size)]
    if method.solve_groups is not None and (method.solve_groups_max is None or group_size <= method.solve_groups_max):
        ctx = editor.context_class(editor, rep, where="independent groups")
        Z, H = ctx.values(reqs, layer)
        K = ctx.keys(reqs, layer)
        factors = method.solve_groups(ctx, K, (Z - H).mT.contiguous(), group_size)
        energy = key_energy(ctx, K, layer) if method.uses_preservation else {}
    else:
        factors = []
        for g, batch in enumerate(groups):
            try:
                sub = editor.edit(batch).batches[0]
                delta = editor.deltas()[layer]
            finally:
                editor.restore()
            for k in ("seconds_values", "seconds_keys", "seconds_solve"):
                setattr(rep, k, getattr(rep, k) + getattr(sub, k))
            rep.value_losses += sub.value_losses
            rep.value_steps += sub.value_steps
            # a closed form's update has rank <= its batch (checked); a fine-tuned one (LocFT-BF,
            # no preservation statistics) is dense and is kept whole
            dense = not method.uses_preservation
            factors.append(low_rank_factors(delta, max_rank=None if dense else len(batch), rtol=0.0 if dense else 1e-4,
                                            what=f"group {g}'s update"))
        energy = {}
        if method.uses_preservation:  # on the restored (unedited) model, as each group saw it
            ctx = editor.context_class(editor, rep, where="independent groups")
            energy = key_energy(ctx, ctx.keys(reqs, layer), layer)
    if len(factors) != len(groups):
        raise RuntimeError(f"{method.name}.solve_groups returned {len(factors)} updates for {len(groups)} groups")
    rep.mark_unconverged(hp.loss_stop)
    rep.seconds = time.perf_counter() - t0
    return GroupUpdates(layer, group_size, factors, rep, energy)


def key_energy(ctx, K: torch.Tensor, layer: int) -> dict:
    """Mean and median over edits of kᵀP⁻¹k, P the preservation matrix ``ctx`` holds for
    ``layer`` (λ·C0 for MEMIT and EMMET): how large an edit's key is next to what is preserved,
    the quantity that makes λ grids of different models comparable (EMMET's λₑ is added to it)."""
    fac = ctx.preservation(layer)
    e = fac.whiten(K.to(device=fac.device, dtype=fac.dtype)).double().pow(2).sum(0)
    return {"kck_mean": float(e.mean()), "kck_median": float(e.median())}
