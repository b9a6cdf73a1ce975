"""pmedit.evaluation: batched target scoring against per-pair forward passes, known-answer
records, per-row rank-one hooks against copying the weights per edit, generation and
perplexity against plain references."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_llama
from pmedit.data import CounterFactRecord
from pmedit.evaluation import (
    GroupDeltas,
    RankOneEdits,
    low_rank_factors,
    evaluate_counterfact,
    generate,
    load_heldout_text,
    perplexity,
    rank_one_factors,
    score_targets,
    encode_pair,
)


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


class _PadTok:
    """Only what score_targets needs of a tokenizer."""

    pad_token_id = 0


def _ref_nll(model, prompt, target):
    """Reference: one unpadded full-model forward per pair, fp64 log-softmax."""
    ids = torch.tensor([list(prompt) + list(target)])
    logits = model(ids).logits[0].double()
    p = len(prompt)
    logp = torch.log_softmax(logits[p - 1 : p + len(target) - 1], -1)
    tok_nll = -logp[torch.arange(len(target)), torch.tensor(target)]
    ok = bool((logits[p - 1 : p + len(target) - 1].argmax(-1) == torch.tensor(target)).all())
    return tok_nll.mean().item(), ok


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_score_targets_matches_per_pair_forward(batch_size, pack, attn):
    model = make_tiny_llama(vocab=50, seed=1, attn_implementation=attn)
    g = torch.Generator().manual_seed(0)
    pairs = []
    for plen, tlen in [(1, 1), (5, 3), (9, 1), (2, 4), (7, 2), (3, 3), (11, 5)]:
        pairs.append((torch.randint(1, 50, (plen,), generator=g).tolist(), torch.randint(1, 50, (tlen,), generator=g).tolist()))
    # prompts scored against several targets (as CounterFact does), which packing shares
    for j in (1, 1, 4, 6):
        pairs.append((pairs[j][0], torch.randint(1, 50, (1 + j % 3,), generator=g).tolist()))
    pairs.append((pairs[3][0], pairs[3][1]))  # the very same pair twice
    with torch.no_grad():
        nll, ok = score_targets(model, _PadTok(), pairs, batch_size=batch_size, pack=pack)
        ref = [_ref_nll(model, p, t) for p, t in pairs]
    # fp32 forward in both; padding, packing and batch composition only change summation order (~1e-6)
    torch.testing.assert_close(nll, torch.tensor([r[0] for r in ref], dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert ok.tolist() == [r[1] for r in ref]


def test_score_targets_rejects_empty():
    model = make_tiny_llama(vocab=50)
    with pytest.raises(ValueError, match="pair 1: empty"):
        score_targets(model, _PadTok(), [([1], [2]), ([1], [])])


def test_rank_one_factors():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, generator=g), torch.randn(9, generator=g)
    a, b = rank_one_factors(torch.outer(u, v))
    torch.testing.assert_close(torch.outer(a, b), torch.outer(u, v), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="not rank one"):
        rank_one_factors(torch.outer(u, v) + torch.outer(torch.randn(6, generator=g), torch.randn(9, generator=g)))


def test_rank_one_hook_equals_weight_update():
    model = make_tiny_llama(seed=2)
    lin = model.model.layers[1].mlp.down_proj
    E, d_out, d = 3, *lin.weight.shape
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(E, d_out, generator=g), torch.randn(E, d, generator=g) * 0.1
    x = torch.randint(0, 128, (4, 7), generator=g)
    rows = [2, -1, 0, 2]
    with torch.no_grad(), RankOneEdits(lin, U, V) as ed:
        ed.set_rows(rows)
        got = model(x).logits
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        for r, e in enumerate(rows):
            if e >= 0:
                lin.weight.add_(torch.outer(U[e], V[e]))
            ref = model(x[r : r + 1]).logits[0]
            lin.weight.copy_(w0)
            torch.testing.assert_close(got[r], ref, atol=1e-4, rtol=1e-4)
    assert not lin._forward_hooks  # the hook is gone after the block


def test_rank_one_edits_validates():
    lin = torch.nn.Linear(4, 3, bias=False)
    with pytest.raises(ValueError, match="do not match the weight"):
        RankOneEdits(lin, torch.zeros(2, 4), torch.zeros(2, 4))
    ed = RankOneEdits(lin, torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"in -1\.\.1"):
        ed.set_rows([0, 2])


def _rec(cid, subject, prompt, new, true, para=(), neigh=(), gen=()):
    return CounterFactRecord(
        case_id=cid, subject=subject, prompt=prompt, target_new=new, target_true=true,
        paraphrase_prompts=tuple(para), neighborhood_prompts=tuple(neigh), generation_prompts=tuple(gen),
        neighborhood_target=true,
    )


KNOWN = [
    # what SmolLM2 knows: the "new" target is the true fact, so ES/PS = 100; the neighbourhood
    # prompt's true answer is also known, so NS = 100
    _rec(0, "France", "The capital of {} is", "Paris", "Berlin",
         para=["Paris is a city. The capital city of France is"], neigh=["The capital of Germany is"]),
    _rec(1, "Japan", "The capital of {} is", "Tokyo", "Madrid",
         para=["Q: What is the capital of Japan? A: The capital of Japan is"], neigh=["The capital of Spain is"]),
]


def test_known_answers(smollm2):
    model, tok = smollm2
    res = evaluate_counterfact(model, tok, KNOWN, progress=False, generation_accuracy=True)
    s = res.summary
    assert (s["es"], s["ps"], s["ns"], s["score"]) == (100.0, 100.0, 100.0, 100.0), s
    assert s["es_mag"] > 0 and s["ns_mag"] > 0 and s["gen_acc"] == 100.0
    # swap the targets: now the rewrite asks for the false answer, which the model rejects
    swapped = [_rec(r.case_id, r.subject, r.prompt, r.target_true, r.target_new, r.paraphrase_prompts,
                    r.neighborhood_prompts) for r in KNOWN]
    s2 = evaluate_counterfact(model, tok, swapped, progress=False).summary
    assert s2["es"] == 0.0 and s2["ps"] == 0.0 and s2["score"] == 0.0


def test_target_tokenisation(smollm2):
    _, tok = smollm2
    _, ids = encode_pair(tok, "The capital of France is", "Paris")
    assert ids == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ids


MIXED = KNOWN + [
    _rec(7, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
         para=["Danielle Darrieux spoke the language", "Where she grew up, Danielle Darrieux spoke"],
         neigh=["Jean Gabin's mother tongue is", "The native language of Louis Jouvet is", "Alain Delon speaks"]),
]


def test_batched_equals_one_prompt_at_a_time(smollm2):
    model, tok = smollm2
    batched = evaluate_counterfact(model, tok, MIXED, progress=False, batch_size=64)
    single = [evaluate_counterfact(model, tok, [r], progress=False, batch_size=1).records[0] for r in MIXED]
    for a, b in zip(batched.records, single):
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            assert a.success[kind] == b.success[kind]
            # fp32; padding and batch composition only reorder sums
            assert a.magnitude[kind] == pytest.approx(b.magnitude[kind], abs=1e-5)


def test_singular_hooks_equal_copying_weights(smollm2):
    """Each record sees only its own delta: compare with W += u vᵀ, evaluate that record alone,
    restore, for every record."""
    model, tok = smollm2
    recs = MIXED
    lin = model.model.layers[5].mlp.down_proj
    w0 = lin.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    # big enough to move the NLLs by O(1) (checked below), so a wrong row mapping would show
    U = torch.randn(len(recs), lin.weight.shape[0], generator=g) * 2.0
    V = torch.randn(len(recs), lin.weight.shape[1], generator=g) * 0.2
    edits = RankOneEdits(lin, U, V)
    hooked = evaluate_counterfact(model, tok, recs, edits=edits, progress=False, generation_accuracy=True)
    assert not lin._forward_hooks
    base = evaluate_counterfact(model, tok, recs, progress=False)
    moved = 0.0
    try:
        for i, r in enumerate(recs):
            with torch.no_grad():
                lin.weight.add_(torch.outer(U[i], V[i]))
            ref = evaluate_counterfact(model, tok, [r], progress=False, generation_accuracy=True).records[0]
            with torch.no_grad():
                lin.weight.copy_(w0)
            got = hooked.records[i]
            assert got.generation_correct == ref.generation_correct
            for kind in ("rewrite", "paraphrase", "neighborhood"):
                # x·(W+uvᵀ) vs W·x + (x·v)u: fp32 reassociation only, ~1e-6 on probabilities
                assert got.magnitude[kind] == pytest.approx(ref.magnitude[kind], abs=1e-4)
                assert got.success[kind] == ref.success[kind]
                moved += abs(ref.magnitude[kind] - base.records[i].magnitude[kind])
    finally:
        with torch.no_grad():
            lin.weight.copy_(w0)
    assert moved > 1e-2, "the deltas did not change anything; the comparison would be vacuous"
    assert torch.equal(lin.weight, w0)


def test_batched_generation_equals_single(smollm2):
    model, tok = smollm2
    prompts = ["The capital of France is", "Water boils at", "My favourite food, above all others, is"]
    batched = generate(model, tok, prompts, max_new_tokens=6)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    a = generate(model, tok, prompts, max_new_tokens=8, do_sample=True, seed=3, force_length=True)
    b = generate(model, tok, prompts, max_new_tokens=8, do_sample=True, seed=3, force_length=True)
    assert a == b


def test_entropy_measured_on_generation_prompts(smollm2):
    model, tok = smollm2
    rec = _rec(0, "France", "The capital of {} is", "Paris", "Berlin",
               gen=["France is a country where", "The people of France often"])
    res = evaluate_counterfact(model, tok, [rec], progress=False, entropy=True, gen_length=20)
    (texts,) = res.texts.values()
    assert len(texts) == 2 and texts[0].startswith("France is a country where")
    from pmedit.evaluation.metrics import generation_entropy

    assert res.records[0].entropy == pytest.approx(generation_entropy(texts))
    assert res.summary["ge"] == pytest.approx(100 * generation_entropy(texts))
    assert res.summary["ge"] > 100  # 20 sampled tokens are not one repeated word


def test_perplexity_matches_hf_loss():
    model = make_tiny_llama(vocab=128, seed=3)

    class Tok:
        def __call__(self, text, add_special_tokens=True):
            if isinstance(text, list):  # batched, as HF tokenizers take it
                return {"input_ids": [self(t)["input_ids"] for t in text]}
            return {"input_ids": [ord(c) % 128 for c in text]}

    text = "hello world, this is a short text for perplexity"
    ids = torch.tensor([Tok()(text)["input_ids"]])
    with torch.no_grad():
        ref = model(ids, labels=ids).loss.item()
    got = perplexity(model, Tok(), [text], window=ids.shape[1])
    assert got["tokens"] == ids.shape[1] - 1
    assert got["nll"] == pytest.approx(ref, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    # windows: the tokens are split, each window scored on its own
    w = perplexity(model, Tok(), [text], window=10)
    assert w["tokens"] == ids.shape[1] - math.ceil(ids.shape[1] / 10)


def test_load_heldout_text(tmp_path):
    p = tmp_path / "w.raw"
    p.write_text(" = Title = \n\n First paragraph . \n = = Sub = = \n Second one . \n")
    assert load_heldout_text(p) == ["First paragraph .", "Second one ."]
    j = tmp_path / "w.jsonl"
    j.write_text('{"text": "a"}\n{"title": "x"}\n')
    with pytest.raises(ValueError, match=r"line 2: field 'text'"):
        load_heldout_text(j)


# ---------------------------------------------------------------------------------------
# per-group low-rank updates


def _group_setup(dtype=torch.float64):
    model = make_tiny_llama(seed=5).to(dtype)
    lin = model.model.layers[2].mlp.down_proj
    d_out, d = lin.weight.shape
    g = torch.Generator().manual_seed(1)
    # three groups: ranks 1, 3 and 4 (a "batch" of up to B=4 edits each)
    deltas = [torch.randn(d_out, r, generator=g, dtype=dtype) @ torch.randn(r, d, generator=g, dtype=dtype) * 0.05
              for r in (1, 3, 4)]
    return model, lin, deltas


def test_low_rank_factors_recover_rank_and_refuse_too_many():
    _, _, deltas = _group_setup()
    for D, r in zip(deltas, (1, 3, 4)):
        U, V = low_rank_factors(D, max_rank=4)
        assert U.shape[1] == V.shape[1] == r
        torch.testing.assert_close(U @ V.mT, D, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="delta 2 has rank 4 > max_rank 3"):
        GroupDeltas.from_deltas(torch.nn.Linear(deltas[0].shape[1], deltas[0].shape[0]), deltas, max_rank=3)
    U, V = low_rank_factors(torch.zeros(3, 5))
    assert U.shape == (3, 0) and V.shape == (5, 0)


def test_group_hook_equals_copying_weights_per_group():
    """Each row sees exactly W + Δ_g of its own group (fp64, so the only difference between the
    hook and the copied weights is reassociation, ~1e-15)."""
    model, lin, deltas = _group_setup()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 128, (6, 9), generator=g)
    rows = [2, -1, 0, 2, 1, 0]
    with torch.no_grad(), GroupDeltas.from_deltas(lin, deltas, max_rank=4) as ed:
        assert [ed.rank(i) for i in range(3)] == [1, 3, 4]
        ed.set_rows(rows)
        got = model(x).logits
    assert not lin._forward_hooks
    w0 = lin.weight.detach().clone()
    moved = 0.0
    with torch.no_grad():
        base = model(x).logits
        for r, grp in enumerate(rows):
            if grp >= 0:
                lin.weight.add_(deltas[grp])
            ref = model(x[r : r + 1]).logits[0]
            lin.weight.copy_(w0)
            torch.testing.assert_close(got[r], ref, atol=1e-12, rtol=1e-12)
            moved += (ref - base[r]).abs().max().item()
    assert moved > 1e-3  # the updates change the logits: the comparison is not vacuous


def test_counterfact_groups_of_records():
    """Records scored in groups under their group's update equal scoring each group with the
    weights copied in (the batch experiment at scale: each batch under its own update)."""
    model, lin, deltas = _group_setup()

    class Tok:
        pad_token_id = bos_token_id = eos_token_id = None
        all_special_ids = []

        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            out = {"input_ids": [ord(c) % 120 + 5 for c in text]}
            if return_offsets_mapping:
                out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
            return out

    recs = [_rec(i, f"S{i}", "{} lives in", f"city{i}", f"town{i}", para=[f"S{i} is in"], neigh=[f"T{i} lives in"])
            for i in range(5)]
    groups = [0, 0, 2, 1, -1]
    tok = Tok()
    hooked = evaluate_counterfact(model, tok, recs, edits=GroupDeltas.from_deltas(lin, deltas), groups=groups,
                                  progress=False)
    w0 = lin.weight.detach().clone()
    try:
        for i, (rec, grp) in enumerate(zip(recs, groups)):
            with torch.no_grad():
                if grp >= 0:
                    lin.weight.add_(deltas[grp])
            ref = evaluate_counterfact(model, tok, [rec], progress=False).records[0]
            with torch.no_grad():
                lin.weight.copy_(w0)
            for kind in ("rewrite", "paraphrase", "neighborhood"):
                assert hooked.records[i].magnitude[kind] == pytest.approx(ref.magnitude[kind], abs=1e-12)
    finally:
        with torch.no_grad():
            lin.weight.copy_(w0)
    with pytest.raises(ValueError, match="groups has 2 entries for 5 records"):
        evaluate_counterfact(model, tok, recs, edits=GroupDeltas.from_deltas(lin, deltas), groups=[0, 1])
