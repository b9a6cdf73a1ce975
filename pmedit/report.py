"""What an edit did: per-batch timings, value losses, solver diagnostics and update norms."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# A final value loss above this (NLL ≈ 1: the target's tokens at ≈ 37 % each, or worse) means
# value optimisation did not reach its target; such edits are applied, but named in the report.
UNCONVERGED_LOSS = 1.0


@dataclass
class BatchReport:
    """What one batch did; per-layer dicts are keyed by layer index.

    ``update_norms`` is ‖ΔW‖_F of the batch (the weights after minus before), ``relative_...``
    divides by ‖W‖_F before the batch. ``jitter`` is the largest absolute Cholesky jitter any
    solve of the batch needed (0.0: none), ``cond_estimates`` the condition estimate of the
    factored d×d matrix, ``residuals`` the relative residual pm_delta reports for its system.
    ``unconverged``: positions (in the batch) of edits whose final value loss stayed above
    ``max(UNCONVERGED_LOSS, 10·loss_stop)``.
    """

    index: int
    n_edits: int
    case_ids: list[Any]
    seconds: float
    value_losses: list[float]
    value_steps: list[int]
    update_norms: dict[int, float] = field(default_factory=dict)
    relative_update_norms: dict[int, float] = field(default_factory=dict)
    jitter: dict[int, float] = field(default_factory=dict)
    cond_estimates: dict[int, float] = field(default_factory=dict)
    residuals: dict[int, float] = field(default_factory=dict)
    seconds_values: float = 0.0
    seconds_keys: float = 0.0
    seconds_solve: float = 0.0
    unconverged: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific figures (JSON-able)

    def mark_unconverged(self, loss_stop: float) -> list[int]:
        bound = max(UNCONVERGED_LOSS, 10 * loss_stop)
        self.unconverged = [i for i, x in enumerate(self.value_losses) if not x <= bound]
        return self.unconverged

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("update_norms", "relative_update_norms", "jitter", "cond_estimates", "residuals"):
            d[k] = {str(layer): v for layer, v in d[k].items()}
        return d


@dataclass
class EditReport:
    """The batches of one ``Editor.edit`` call, in order."""

    method: str
    layers: list[int]
    batch_size: int
    n_edits: int
    batches: list[BatchReport]
    seconds: float

    @property
    def value_losses(self) -> list[float]:
        return [x for b in self.batches for x in b.value_losses]

    @property
    def unconverged(self) -> list[Any]:
        """case_ids (or global positions where there is none) of edits that did not converge."""
        out, start = [], 0
        for b in self.batches:
            out += [b.case_ids[i] if b.case_ids[i] is not None else start + i for i in b.unconverged]
            start += b.n_edits
        return out

    def to_dict(self) -> dict:
        return {
            "method": self.method, "layers": list(self.layers), "batch_size": self.batch_size,
            "n_edits": self.n_edits, "seconds": self.seconds, "batches": [b.to_dict() for b in self.batches],
        }

    def summary(self) -> str:
        norms = [max(b.relative_update_norms.values(), default=0.0) for b in self.batches]
        losses = self.value_losses
        text = (
            f"{self.method} on layers {self.layers}: {self.n_edits} edits in {len(self.batches)} batch(es) of "
            f"<= {self.batch_size}, {self.seconds:.1f}s; final value loss mean "
            f"{(sum(losses) / len(losses)) if losses else float('nan'):.3f}; largest relative update "
            f"{max(norms, default=0.0):.2e}"
        )
        bad = self.unconverged
        if bad:
            shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
            text += f"; WARNING: {len(bad)} edit(s) did not converge (value loss > {UNCONVERGED_LOSS:g}): {shown}"
        return text


def relative(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf
