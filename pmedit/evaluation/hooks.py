"""Evaluate many edits at once without touching the weights: per-group low-rank updates of one
linear module, applied by a forward hook to the batch rows of each group.

A batch of B edits of ROME, MEMIT or EMMET changes ``down_proj`` by Δ = R (…)⁻¹ KᵀC⁻¹, a
matrix of rank ≤ B; a single edit is rank one. Judging each group of edits on its own
(singular edits in the layer sweep, each batch of a large run under its own update) would
naively need a weight copy per group. Here group g's update is kept as factors
Δ_g = U_g V_gᵀ (U_g [d_out, r_g], V_g [d, r_g]) and the hook adds ``(x V_g) U_gᵀ`` to the
output rows that belong to group g, so rows of many groups share one batch. That equals the
module with weight W + Δ_g for those rows, up to floating-point reassociation.

Not here: computing the updates (pmedit.methods / pmedit.editor) or choosing groups.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["GroupDeltas", "RankOneEdits", "edits_scope", "low_rank_factors", "rank_one_factors"]


@contextlib.contextmanager
def edits_scope(edits):
    """Activate ``edits`` (a GroupDeltas or None) for the block unless the caller already did:
    scorers enter it themselves, so an inactive hook can never be silently ignored."""
    with contextlib.ExitStack() as stack:
        if edits is not None and not edits.active:
            stack.enter_context(edits)
        yield


class GroupDeltas:
    """G low-rank updates Δ_g = U_g V_gᵀ of one linear module, one per group of batch rows.

    Used as a context manager: while active, a forward hook on ``module`` adds
    ``(x_r V_g) U_gᵀ`` to row r's output, where ``rows[r] = g`` (−1: no edit). The scorer sets
    ``rows`` (:meth:`set_rows`) before each forward pass.
    """

    def __init__(self, module: nn.Module, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2:
            raise ValueError(f"{type(self).__name__} needs a linear module with a 2-D weight, got {type(module).__name__}")
        d_out, d = w.shape
        self.module = module
        self.U: list[torch.Tensor] = []
        self.V: list[torch.Tensor] = []
        for g, (U, V) in enumerate(factors):
            if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[1]:
                raise ValueError(f"group {g}: U and V must be [d_out, r] and [d, r] with the same r, "
                                 f"got {tuple(U.shape)} and {tuple(V.shape)}")
            if U.shape[0] != d_out or V.shape[0] != d:
                raise ValueError(f"group {g}: U {tuple(U.shape)} / V {tuple(V.shape)} do not match the weight [{d_out}, {d}]")
            self.U.append(U.to(device=w.device, dtype=w.dtype))
            self.V.append(V.to(device=w.device, dtype=w.dtype))
        self.rows: torch.Tensor | None = None
        self._handle = None

    @classmethod
    def from_deltas(cls, module: nn.Module, deltas: Sequence[torch.Tensor], *, max_rank: int | None = None,
                    rtol: float = 1e-4) -> GroupDeltas:
        """Factors of dense updates [d_out, d] (see :func:`low_rank_factors`)."""
        return cls(module, [low_rank_factors(D, max_rank=max_rank, rtol=rtol, what=f"delta {g}")
                            for g, D in enumerate(deltas)])

    def __len__(self) -> int:
        return len(self.U)

    def rank(self, g: int) -> int:
        return self.U[g].shape[1]

    @property
    def active(self) -> bool:
        return self._handle is not None

    def set_rows(self, rows: Sequence[int] | torch.Tensor) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.module.weight.device)
        if rows.numel() and (rows.max() >= len(self) or rows.min() < -1):
            raise ValueError(f"row edit indices must be in -1..{len(self) - 1}, got {rows.min().item()}..{rows.max().item()}")
        self.rows = rows

    def _hook(self, module, args, output):
        if self.rows is None:
            raise RuntimeError(f"{type(self).__name__}: set_rows() was not called before the forward pass")
        x = args[0]
        if x.shape[0] != self.rows.shape[0]:
            raise RuntimeError(f"{type(self).__name__}: batch has {x.shape[0]} rows but {self.rows.shape[0]} "
                               f"row edits were set")
        return output + self._delta_output(x, output)

    def _delta_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        add = torch.zeros_like(output)
        for g in torch.unique(self.rows[self.rows >= 0]).tolist():
            sel = self.rows == g
            add[sel] = (x[sel] @ self.V[g]) @ self.U[g].mT
        return add

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.rows = None


class RankOneEdits(GroupDeltas):
    """E rank-one updates Δ_e = U[e] ⊗ V[e] (U [E, d_out], V [E, d]): one group per edit.

    The hook computes ``(x·V[e]) U[e]`` for all rows at once (one gather, no loop over edits),
    the cheap case of singular-edit evaluation.
    """

    def __init__(self, module: nn.Module, U: torch.Tensor, V: torch.Tensor):
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2:
            raise ValueError(f"RankOneEdits needs a linear module with a 2-D weight, got {type(module).__name__}")
        d_out, d = w.shape
        if U.dim() != 2 or V.dim() != 2 or U.shape[0] != V.shape[0]:
            raise ValueError(f"U and V must be [E, d_out] and [E, d] with the same E, got {tuple(U.shape)} and {tuple(V.shape)}")
        if U.shape[1] != d_out or V.shape[1] != d:
            raise ValueError(f"U {tuple(U.shape)} / V {tuple(V.shape)} do not match the weight [{d_out}, {d}]")
        super().__init__(module, [(U[e][:, None], V[e][:, None]) for e in range(U.shape[0])])
        self.U1 = U.to(device=w.device, dtype=w.dtype)
        self.V1 = V.to(device=w.device, dtype=w.dtype)

    def _delta_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        has = self.rows >= 0
        idx = self.rows.clamp(min=0)
        V = self.V1[idx] * has[:, None].to(self.V1.dtype)  # rows without an edit get a zero delta
        U = self.U1[idx]
        coef = torch.einsum("b...d,bd->b...", x, V)
        return coef.unsqueeze(-1) * U.view(U.shape[0], *([1] * (x.dim() - 2)), U.shape[1])


def low_rank_factors(delta: torch.Tensor, *, max_rank: int | None = None, rtol: float = 1e-4,
                     what: str = "delta") -> tuple[torch.Tensor, torch.Tensor]:
    """U [d_out, r], V [d, r] with U Vᵀ = delta, r its numerical rank, from an fp64 SVD.

    Directions with σ ≤ ``rtol``·σ₁ are dropped (a 1e-4 slack covers the solver's fp32
    accumulation, ~1e-7, while a real direction of a batch update is far larger). More than
    ``max_rank`` directions above that is an error: a batch of B edits has rank ≤ B.
    """
    if delta.dim() != 2:
        raise ValueError(f"{what} must be 2-D [d_out, d], got shape {tuple(delta.shape)}")
    d64 = delta.detach().to(torch.float64)
    Us, S, Vh = torch.linalg.svd(d64, full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        r = 0
    else:
        r = int((S > rtol * S[0]).sum())
    if max_rank is not None and r > max_rank:
        raise ValueError(f"{what} has rank {r} > max_rank {max_rank} (singular values "
                         f"{S[0].item():.3g} .. {S[r - 1].item():.3g} above {rtol:g}·σ₁)")
    return (Us[:, :r] * S[:r]).to(delta.dtype), Vh[:r].mT.to(delta.dtype)


def rank_one_factors(delta: torch.Tensor, *, rtol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """u, v with u vᵀ = delta, for a delta that is rank one (a single-edit update).

    From the SVD in fp64: u = σ₁u₁, v = v₁. Refuses a delta whose second singular value is
    above ``rtol``·σ₁: a 1e-4 slack covers fp32 accumulation in the solver (observed ~1e-7)
    while any real second direction (a two-edit batch) is orders of magnitude larger.
    """
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D [d_out, d], got shape {tuple(delta.shape)}")
    d64 = delta.detach().to(torch.float64)
    Us, S, Vh = torch.linalg.svd(d64, full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return torch.zeros(delta.shape[0], dtype=delta.dtype), torch.zeros(delta.shape[1], dtype=delta.dtype)
    if S.numel() > 1 and S[1] > rtol * S[0]:
        raise ValueError(f"delta is not rank one: singular values {S[0].item():.3g}, {S[1].item():.3g}")
    return (Us[:, 0] * S[0]).to(delta.dtype), Vh[0].to(delta.dtype)
