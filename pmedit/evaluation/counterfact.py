"""CounterFact ES/PS/NS (+ magnitudes, teacher-forced accuracy), generation accuracy and GE,
batched over records, optionally each record group under its own update (singular-edit or
per-batch evaluation through :class:`pmedit.evaluation.hooks.GroupDeltas`).

Targets are tokenised as value optimisation tokenises them (:mod:`pmedit.tokens`): a leading
space and no BOS in the target ids, the prompt with the BOS its tokenizer prepends. MEMIT's
code tokenised `` target`` *with* special tokens, which on Llama tokenizers puts a BOS inside
the scored sequence; that bug is deliberately not reproduced.

Not here: the metric arithmetic (:mod:`pmedit.evaluation.metrics`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pmedit.evaluation.hooks import edits_scope
from pmedit.evaluation.metrics import (PromptScores, RecordScores, generation_entropy, mean_interval, record_scores,
                                      summarize)
from pmedit.evaluation.scoring import PairEncoder, generate, score_targets

__all__ = ["EvalResult", "evaluate_counterfact", "record_groups"]


@dataclass
class EvalResult:
    records: list[RecordScores]
    summary: dict
    texts: dict | None = None  # case_id -> generated fluency texts, when GE was measured

    def to_dict(self) -> dict:
        return {"summary": self.summary, "records": [r.to_dict() for r in self.records]}


def _kinds(rec) -> list[tuple[str, list[str], str, str]]:
    """(kind, prompts, expected target, the other target) of a record."""
    return [
        ("rewrite", [rec.rewrite_prompt], rec.target_new, rec.target_true),
        ("paraphrase", list(rec.paraphrase_prompts), rec.target_new, rec.target_true),
        ("neighborhood", list(rec.neighborhood_prompts), rec.neighborhood_target, rec.target_new),
    ]


def record_groups(n_records: int, edits, groups: Sequence[int] | None) -> list[int] | None:
    """The update each record is scored under: ``groups[i]`` (default: record i ↔ group i)."""
    if edits is None:
        if groups is not None:
            raise ValueError("groups given without edits")
        return None
    if groups is None:
        if len(edits) != n_records:
            raise ValueError(f"edits holds {len(edits)} deltas for {n_records} records")
        return list(range(n_records))
    groups = [int(g) for g in groups]
    if len(groups) != n_records:
        raise ValueError(f"groups has {len(groups)} entries for {n_records} records")
    bad = [g for g in groups if not -1 <= g < len(edits)]
    if bad:
        raise ValueError(f"groups must be in -1..{len(edits) - 1}, got {bad[0]}")
    return groups


@torch.no_grad()
def evaluate_counterfact(
    model: nn.Module,
    tok,
    records: Sequence,
    *,
    edits=None,
    groups: Sequence[int] | None = None,
    batch_size: int | None = None,
    generation_accuracy: bool = False,
    entropy: bool = False,
    max_gen_prompts: int | None = None,
    gen_length: int = 100,
    gen_batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> EvalResult:
    """ES/PS/NS (+ magnitudes, teacher-forced accuracy), optionally generation accuracy and GE.

    ``edits``: per-group low-rank updates; record i sees only group ``groups[i]`` (default:
    group i, the singular-edit case). None scores the model as it is. Generation accuracy: the
    greedy continuation of the rewrite prompt (as many tokens as the new target has, plus 3)
    contains ``target_new``. GE: each of the record's generation prompts (at most
    ``max_gen_prompts``) continued by top-k-5 sampling to ``gen_length`` new tokens (MEMIT:
    100); entropy of prompt+continuation.
    """
    rg = record_groups(len(records), edits, groups)
    with edits_scope(edits):
        return _evaluate(model, tok, records, edits=edits, rg=rg, batch_size=batch_size,
                         generation_accuracy=generation_accuracy, entropy=entropy, max_gen_prompts=max_gen_prompts,
                         gen_length=gen_length, gen_batch_size=gen_batch_size, seed=seed, progress=progress)


@torch.no_grad()
def prompt_entropy(model: nn.Module, tok, records: Sequence, *, max_gen_prompts: int = 2, gen_length: int = 100,
                   gen_batch_size: int = 32, seed: int = 0, progress: bool = False) -> dict[str, float]:
    """GE (×100, with its bootstrap interval over records) of the model as it is, on the
    generation prompts of ``records``: a fluency probe. Given a fixed sample of records (which
    an edit run need not touch), the prompts stay the same at every batch size, λ and
    checkpoint, so the values compare across them; the sampling is seeded for the same reason."""
    prompts, who = [], []
    for ri, rec in enumerate(records):
        gp = list(getattr(rec, "generation_prompts", ()))[:max_gen_prompts]
        prompts += gp
        who += [ri] * len(gp)
    if not prompts:
        raise ValueError("prompt_entropy: the records hold no generation prompts (the reduced CounterFact layout "
                         "has none; use the original layout)")
    conts = generate(model, tok, prompts, max_new_tokens=gen_length, do_sample=True, top_k=5, seed=seed,
                     batch_size=gen_batch_size, force_length=True, progress=progress)
    per = [generation_entropy([p + c for p, c, w in zip(prompts, conts, who) if w == ri]) for ri in sorted(set(who))]
    lo, hi = mean_interval(per, seed=seed)
    return {"ge": 100.0 * sum(per) / len(per), "ge_lo": 100.0 * lo, "ge_hi": 100.0 * hi, "ge_records": len(per)}


def _evaluate(model, tok, records, *, edits, rg, batch_size, generation_accuracy, entropy, max_gen_prompts,
              gen_length, gen_batch_size, seed, progress) -> EvalResult:
    enc = PairEncoder(tok)
    pairs, owner = [], []  # owner: (record, kind, prompt index, is_new)
    for ri, rec in enumerate(records):
        for kind, prompts, _, _ in _kinds(rec):
            true = rec.neighborhood_target if kind == "neighborhood" else rec.target_true
            for pi, prompt in enumerate(prompts):
                pairs.append(enc(prompt, rec.target_new))
                owner.append((ri, kind, pi, True))
                pairs.append(enc(prompt, true))
                owner.append((ri, kind, pi, False))
    row_edits = [rg[o[0]] for o in owner] if edits is not None else None
    nll, correct = score_targets(model, tok, pairs, edits=edits, row_edits=row_edits, batch_size=batch_size,
                                 progress=progress)

    per: list[dict[str, PromptScores]] = [
        {k: PromptScores([], [], []) for k in ("rewrite", "paraphrase", "neighborhood")} for _ in records
    ]
    for j, (ri, kind, _pi, is_new) in enumerate(owner):
        ps = per[ri][kind]
        if is_new:
            ps.nll_new.append(nll[j].item())
            if kind != "neighborhood":
                ps.correct.append(bool(correct[j]))
        else:
            ps.nll_true.append(nll[j].item())
            if kind == "neighborhood":
                ps.correct.append(bool(correct[j]))
    scores = [
        record_scores(p["rewrite"], p["paraphrase"], p["neighborhood"], case_id=getattr(rec, "case_id", None))
        for p, rec in zip(per, records)
    ]

    if generation_accuracy:
        n_new = max(len(enc(r.rewrite_prompt, r.target_new)[1]) for r in records) + 3
        conts = generate(model, tok, [r.rewrite_prompt for r in records], max_new_tokens=n_new,
                         batch_size=gen_batch_size, edits=edits, row_edits=rg, progress=progress)
        for sc, rec, c in zip(scores, records, conts):
            sc.generation_correct = rec.target_new in c

    texts = None
    if entropy:
        prompts, who = [], []
        for ri, rec in enumerate(records):
            gp = list(rec.generation_prompts)[: max_gen_prompts]
            prompts += gp
            who += [ri] * len(gp)
        if prompts:
            conts = generate(
                model, tok, prompts, max_new_tokens=gen_length, do_sample=True, top_k=5, seed=seed,
                batch_size=gen_batch_size, edits=edits, row_edits=[rg[w] for w in who] if edits is not None else None,
                force_length=True, progress=progress,
            )
            texts = {}
            for ri in sorted(set(who)):
                ts = [p + c for p, c, w in zip(prompts, conts, who) if w == ri]
                scores[ri].entropy = generation_entropy(ts)
                texts[getattr(records[ri], "case_id", ri)] = ts
    return EvalResult(records=scores, summary=summarize(scores), texts=texts)
