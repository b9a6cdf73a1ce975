"""Exact match (the LocFT-BF protocol): does the model, generating greedily after the rewrite
prompt (and after each paraphrase), produce the target?

The continuation is as many tokens as the target has (stopping early at end-of-sequence),
decoded and compared with the target after SQuAD normalisation (lower-case, no punctuation,
no articles, collapsed whitespace; :func:`pmedit.evaluation.metrics.normalize_answer`). Greedy
decoding makes it deterministic. Works on CounterFact and zsRE records and on edit requests
(which have no paraphrases).

Not here: teacher-forced scores (counterfact, zsre), which say whether the target is *preferred*
rather than *produced*.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pmedit.evaluation.counterfact import record_groups
from pmedit.evaluation.hooks import edits_scope
from pmedit.evaluation.metrics import exact_match
from pmedit.evaluation.scoring import PairEncoder, generate

__all__ = ["ExactMatchResult", "evaluate_exact_match", "em_prompts"]


def em_prompts(rec) -> tuple[str, list[str], str]:
    """(rewrite prompt, paraphrase prompts, target) of a CounterFact/zsRE record or a request."""
    if hasattr(rec, "rewrite_prompt"):
        return rec.rewrite_prompt, list(getattr(rec, "paraphrase_prompts", ())), rec.target_new
    if hasattr(rec, "filled_prompt"):  # pmedit.requests.EditRequest
        return rec.filled_prompt, [], rec.target_new
    raise TypeError(f"exact match needs a CounterFact/zsRE record or an EditRequest, got {type(rec).__name__}")


@dataclass
class ExactMatchResult:
    records: list[dict]  # case_id, rewrite (0/1), paraphrase (mean over prompts or None), texts
    summary: dict  # em_rewrite, em_paraphrase (×100), n_records

    def to_dict(self) -> dict:
        return {"summary": self.summary, "records": self.records}


@torch.no_grad()
def evaluate_exact_match(
    model: nn.Module,
    tok,
    records: Sequence,
    *,
    edits=None,
    groups: Sequence[int] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> ExactMatchResult:
    """Greedy exact match after each record's rewrite and paraphrase prompts."""
    rg = record_groups(len(records), edits, groups)
    enc = PairEncoder(tok)
    prompts, owner, lengths = [], [], []
    for ri, rec in enumerate(records):
        rewrite, paras, target = em_prompts(rec)
        for kind, p in [("rewrite", rewrite)] + [("paraphrase", q) for q in paras]:
            _, tids = enc(p, target)
            prompts.append(p.rstrip())  # the target brings its own leading space
            owner.append((ri, kind))
            lengths.append(len(tids))
    # Prompts with equal target lengths share a generate call, so no row generates past its own
    # target (greedy continuations do not depend on how long generation runs).
    conts: list[list[int]] = [[] for _ in prompts]
    with edits_scope(edits):
        for n in sorted(set(lengths)):
            idx = [i for i, m in enumerate(lengths) if m == n]
            got = generate(model, tok, [prompts[i] for i in idx], max_new_tokens=n, batch_size=batch_size,
                           edits=edits, row_edits=[rg[owner[i][0]] for i in idx] if rg is not None else None,
                           return_ids=True, progress=progress)
            for i, g in zip(idx, got):
                conts[i] = g
    out = [{"case_id": getattr(rec, "case_id", ri), "rewrite": None, "paraphrase": None, "texts": []}
           for ri, rec in enumerate(records)]
    para_hits: dict[int, list[bool]] = {}
    for i, (ri, kind) in enumerate(owner):
        text = tok.decode(conts[i], skip_special_tokens=True)
        hit = exact_match(text, em_prompts(records[ri])[2])
        out[ri]["texts"].append(text)
        if kind == "rewrite":
            out[ri]["rewrite"] = float(hit)
        else:
            para_hits.setdefault(ri, []).append(hit)
    for ri, hits in para_hits.items():
        out[ri]["paraphrase"] = float(np.mean(hits))
    summary: dict = {"n_records": len(records)}
    for key in ("rewrite", "paraphrase"):
        vals = [r[key] for r in out if r[key] is not None]
        summary[f"em_{key}"] = 100.0 * float(np.mean(vals)) if vals else None
    return ExactMatchResult(out, summary)
