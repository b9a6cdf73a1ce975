"""Evaluation throughput on SmolLM2: batched CounterFact ES/PS/NS, zsRE token accuracy,
downstream choice scoring and exact-match generation, each against one prompt at a time; and
singular-edit evaluation through per-row hooks against copying weights per edit.

"one prompt at a time" is the naive evaluation loop: one full-model forward per
(prompt, target) pair, full logits, NLL from them. "batched" is
:func:`pmedit.evaluation.evaluate_counterfact`: all pairs of all records in padded batches, one
forward each, each prompt packed once with both of its targets, the output embedding only at
target positions. Both produce the same NLLs (the
bench checks it) on the original-layout CounterFact records (1 rewrite + 2 paraphrase + 10
neighbourhood prompts, two targets each: 26 sequences per record).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pmedit.bench.harness import Row, compare

ORDER = 50
HELP = "CounterFact/zsRE/downstream scoring and exact match: batched vs one prompt at a time; hooks vs weight copies"

DATA = Path(os.environ.get("PMEDIT_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _naive_scores(model, tok, records):
    """The reference loop: one unpadded full-model forward per prompt and target."""
    from pmedit.evaluation import encode_pair

    out = []
    with torch.no_grad():
        for rec in records:
            kinds = [([rec.rewrite_prompt], rec.target_true), (list(rec.paraphrase_prompts), rec.target_true),
                     (list(rec.neighborhood_prompts), rec.neighborhood_target)]
            for prompts, true in kinds:
                for p in prompts:
                    for target in (rec.target_new, true):
                        pi, ti = encode_pair(tok, p, target)
                        logits = model(torch.tensor([pi + ti])).logits[0]
                        logp = torch.log_softmax(logits[len(pi) - 1 : len(pi) + len(ti) - 1].float(), -1)
                        out.append(-logp[torch.arange(len(ti)), torch.tensor(ti)].mean().item())
    return out


def run(quick: bool = False) -> list[Row]:
    from pmedit.data import load_counterfact
    from pmedit.evaluation import RankOneEdits, evaluate_counterfact
    from pmedit.models import load_model

    path = DATA / "counterfact" / "counterfact_original_500.json"
    if not path.is_file():
        print(f"eval: skipped, {path} not found (set PMEDIT_SHARED_DATA)")
        return []
    n = 4 if quick else 8
    repeats = 2 if quick else 3
    records = load_counterfact(path, limit=n)
    model, tok = load_model()
    model.eval()

    # the two paths must agree before their speed means anything
    res = evaluate_counterfact(model, tok, records, progress=False)
    naive = _naive_scores(model, tok, records[:1])
    want = float(torch.exp(torch.tensor(-naive[0])) - torch.exp(torch.tensor(-naive[1])))
    if abs(res.records[0].magnitude["rewrite"] - want) > 1e-4:  # fp32 padding/batching noise is ~1e-6
        raise RuntimeError(f"batched and one-at-a-time scores disagree: {res.records[0].magnitude['rewrite']} vs {want}")

    case = f"{n} records x 26 seqs, SmolLM2 fp32"
    rows = compare(
        "eval", case,
        {
            "one prompt at a time": lambda: _naive_scores(model, tok, records),
            "batched": lambda: evaluate_counterfact(model, tok, records, progress=False),
        },
        reference="one prompt at a time", work=n, unit="records", repeats=repeats, warmup=1,
    )

    lin = model.model.layers[4].mlp.down_proj
    w0 = lin.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    U = torch.randn(n, lin.weight.shape[0], generator=g)
    V = torch.randn(n, lin.weight.shape[1], generator=g) * 0.05

    def copy_per_edit():
        try:
            for i, rec in enumerate(records):
                with torch.no_grad():
                    lin.weight.add_(torch.outer(U[i], V[i]))
                evaluate_counterfact(model, tok, [rec], progress=False)
                with torch.no_grad():
                    lin.weight.copy_(w0)
        finally:
            with torch.no_grad():
                lin.weight.copy_(w0)

    def hooks():
        evaluate_counterfact(model, tok, records, edits=RankOneEdits(lin, U, V), progress=False)

    rows += compare(
        "eval", f"{n} singular edits (rank-one, layer 4), ES/PS/NS",
        {"copy weights per edit": copy_per_edit, "per-row hooks": hooks},
        reference="copy weights per edit", work=n, unit="records", repeats=repeats, warmup=1,
    )
    if not torch.equal(lin.weight, w0):
        raise RuntimeError("eval bench left the model edited")
    return rows + _new_scorers(model, tok, quick, repeats)


def _naive_pair(model, pi, ti):
    """(summed log-likelihood, target tokens that are the argmax): one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([pi + ti])).logits[0, len(pi) - 1 : len(pi) + len(ti) - 1].float()
    logp = torch.log_softmax(logits, -1)[torch.arange(len(ti)), torch.tensor(ti)]
    return logp.sum().item(), int((logits.argmax(-1) == torch.tensor(ti)).sum())


def _new_scorers(model, tok, quick: bool, repeats: int) -> list[Row]:
    """zsRE token accuracy, downstream choice scoring (SST-2, MMLU) and exact match."""
    from pmedit.evaluation import encode_pair, evaluate_exact_match, evaluate_zsre, load_task, score_task
    from pmedit.evaluation.registry import load_dataset

    rows: list[Row] = []
    n = 8 if quick else 32
    zs = load_dataset("zsre", DATA / "zsre" / "locft_zsre_3k.json", limit=n)

    def zsre_naive():
        """Per record (efficacy, paraphrase, specificity): correct tokens / target tokens."""
        out = []
        for r in zs:
            acc = []
            for pairs in ([(r.rewrite_prompt, r.target_new)], [(q, r.target_new) for q in r.paraphrase_prompts],
                          [(r.loc_prompt + "?", r.loc_answer)]):
                enc = [encode_pair(tok, p, t) for p, t in pairs]
                acc.append(sum(_naive_pair(model, *e)[1] for e in enc) / sum(len(e[1]) for e in enc))
            out.append(tuple(acc))
        return out

    got = [(s.efficacy, s.paraphrase, s.specificity) for s in evaluate_zsre(model, tok, zs).records]
    if got != zsre_naive():
        raise RuntimeError(f"zsRE: batched and one-at-a-time token accuracies differ: {got} vs {zsre_naive()}")
    rows += compare("eval", f"zsRE token accuracy, {n} records x 3 prompts",
                    {"one prompt at a time": zsre_naive, "batched": lambda: evaluate_zsre(model, tok, zs)},
                    reference="one prompt at a time", work=n, unit="records", repeats=repeats, warmup=1)

    for task, k in (("sst2", 16 if quick else 64), ("mmlu", 4 if quick else 16)):
        ex = load_task(task, DATA, limit=k)

        def naive(ex=ex):
            return [max(range(len(e.choices)), key=lambda c, e=e: _naive_pair(model, *encode_pair(tok, e.prompt,
                                                                                                    e.choices[c]))[0])
                    for e in ex]

        if naive() != score_task(model, tok, task, ex).pred:
            raise RuntimeError(f"{task}: batched and one-at-a-time predictions differ")
        rows += compare("eval", f"{task} choice scoring, {k} examples x {len(ex[0].choices)} choices",
                        {"one prompt at a time": naive, "batched": lambda ex=ex, task=task: score_task(model, tok, task, ex)},
                        reference="one prompt at a time", work=k, unit="examples", repeats=repeats, warmup=1)

    cf = load_dataset("counterfact", DATA / "counterfact" / "counterfact_original_500.json", limit=4 if quick else 16)
    one = lambda: [evaluate_exact_match(model, tok, [r], batch_size=1).records[0] for r in cf]  # noqa: E731
    if [r["texts"] for r in one()] != [r["texts"] for r in evaluate_exact_match(model, tok, cf).records]:
        raise RuntimeError("exact match: batched and one-at-a-time generations differ")
    rows += compare("eval", f"exact match (greedy), {len(cf)} CounterFact records x 3 prompts",
                    {"one prompt at a time": one, "batched": lambda: evaluate_exact_match(model, tok, cf)},
                    reference="one prompt at a time", work=len(cf), unit="records", repeats=repeats, warmup=1)
    return rows
