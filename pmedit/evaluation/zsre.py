"""zsRE edit metrics (the MEMIT/EMMET protocol): teacher-forced token accuracy of the new
answer after the question (efficacy) and after its rephrasing (paraphrase), and of the true
answer to an unrelated Natural-Questions question (specificity).

Token accuracy: with the answer's own tokens fed in (teacher forcing), the fraction of answer
tokens that are the model's argmax; per record the mean over the tokens of that kind's
prompts, then the mean over records (×100). MEMIT re-tokenises decoded prefixes one prompt per
token; here the answer ids are scored in one packed pass (pmedit.evaluation.scoring), which is
the same quantity without the round trip through text. The unrelated question is MEND's ``loc``
followed by ``"?"``, as MEMIT builds it.

Not here: loading (pmedit.data.load_zsre) and exact match (pmedit.evaluation.exact_match).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pmedit.evaluation.counterfact import record_groups
from pmedit.evaluation.hooks import edits_scope
from pmedit.evaluation.scoring import PairEncoder, score_pairs

__all__ = ["ZsreScores", "ZsreResult", "evaluate_zsre", "zsre_summary"]

KINDS = ("efficacy", "paraphrase", "specificity")
SUMMARY_KEYS = {"efficacy": "zsre_es", "paraphrase": "zsre_ps", "specificity": "zsre_ns"}


@dataclass
class ZsreScores:
    """One record's token accuracies (0..1); a kind without prompts is None."""

    case_id: int | None
    efficacy: float | None
    paraphrase: float | None
    specificity: float | None

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "efficacy": self.efficacy, "paraphrase": self.paraphrase,
                "specificity": self.specificity}


@dataclass
class ZsreResult:
    records: list[ZsreScores]
    summary: dict

    def to_dict(self) -> dict:
        return {"summary": self.summary, "records": [r.to_dict() for r in self.records]}


def _prompts(rec) -> list[tuple[str, list[str], str]]:
    return [
        ("efficacy", [rec.rewrite_prompt], rec.target_new),
        ("paraphrase", list(rec.paraphrase_prompts), rec.target_new),
        ("specificity", [rec.loc_prompt + "?"], rec.loc_answer),
    ]


def zsre_summary(records: Sequence[ZsreScores]) -> dict:
    """zsre_es / zsre_ps / zsre_ns: means over records ×100 (None when no record has the kind)."""
    out: dict = {"n_records": len(records)}
    for kind, key in SUMMARY_KEYS.items():
        vals = [getattr(r, kind) for r in records if getattr(r, kind) is not None]
        out[key] = 100.0 * float(np.mean(vals)) if vals else None
    return out


@torch.no_grad()
def evaluate_zsre(
    model: nn.Module,
    tok,
    records: Sequence,
    *,
    edits=None,
    groups: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> ZsreResult:
    """Token accuracies of zsRE records (:class:`pmedit.data.ZsreRecord`), all prompts of all
    records in one batched scoring; ``edits``/``groups`` as for evaluate_counterfact."""
    rg = record_groups(len(records), edits, groups)
    enc = PairEncoder(tok)
    pairs, owner = [], []
    for ri, rec in enumerate(records):
        for kind, prompts, target in _prompts(rec):
            for p in prompts:
                pairs.append(enc(p, target))
                owner.append((ri, kind))
    with edits_scope(edits):
        s = score_pairs(model, tok, pairs, edits=edits, row_edits=[rg[o[0]] for o in owner] if rg is not None else None,
                        batch_size=batch_size, progress=progress)
    ok = {(ri, k): [0, 0] for ri in range(len(records)) for k in KINDS}
    for j, key in enumerate(owner):
        ok[key][0] += int(s.n_correct[j])
        ok[key][1] += int(s.n_tokens[j])
    scores = []
    for ri, rec in enumerate(records):
        acc = {k: (ok[(ri, k)][0] / ok[(ri, k)][1] if ok[(ri, k)][1] else None) for k in KINDS}
        scores.append(ZsreScores(getattr(rec, "case_id", ri), **acc))
    return ZsreResult(scores, zsre_summary(scores))
