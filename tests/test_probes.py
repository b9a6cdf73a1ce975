"""zsRE token accuracy, exact match and log-likelihood choice scoring against scores computed by
hand on a bigram model whose next-token distribution is known exactly; batched equals one at a
time; data errors name file, record and field; the registry wires datasets to metric sets."""
from __future__ import annotations

import json
import math
import string
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from pmedit.data import ZsreRecord
from pmedit.evaluation import (
    METRIC_SETS, Task, classification_scores, evaluate_exact_match, evaluate_zsre, generate, load_task,
    normalize_answer, run_metric_sets, score_task,
)
from pmedit.evaluation.downstream import Example
from pmedit.evaluation.hooks import GroupDeltas
from pmedit.evaluation.registry import check_metric_sets, load_dataset
from pmedit.requests import EditRequest

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

CHARS = " abcdefghijklmnopqrstuvwxyz\n?"  # succ(c) = the next character, cyclically
V = len(CHARS)
L = math.log(math.exp(2.0) + V - 1)  # log-partition of every bigram row: logit 2 at succ, 0 elsewhere
RIGHT, WRONG = 2.0 - L, -L  # log-prob of the successor / of any other character


def succ(c: str) -> str:
    return CHARS[(CHARS.index(c) + 1) % V]


class CharTok:
    """One id per character of CHARS; no special tokens."""

    pad_token_id = bos_token_id = eos_token_id = None
    all_special_ids: list = []

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        out = {"input_ids": [CHARS.index(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def decode(self, ids, **kw):
        return "".join(CHARS[i] for i in ids)


class _BigramBody(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=self.emb(input_ids))


class Bigram(nn.Module):
    """logits at a position = row ``current token`` of a fixed table: every score is hand-computable."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(V, V)
        for i, c in enumerate(CHARS):
            table[i, CHARS.index(succ(c))] = 2.0
        self.config = SimpleNamespace(_attn_implementation="eager")
        self.emb = nn.Embedding(V, V)
        self.emb.weight.data = torch.eye(V)
        self.head = nn.Linear(V, V, bias=False)
        self.head.weight.data = table.T.contiguous()
        self.decoder = _BigramBody(self.emb)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def _zsre(cid, subject, src, answer, rephrase, loc, loc_ans):
    return ZsreRecord(case_id=cid, subject=subject, prompt=src.replace(subject, "{}"), target_new=answer,
                      answers=(answer,), alt="x", pred="", paraphrase_prompts=(rephrase,), loc_prompt=loc,
                      loc_answer=loc_ans)


ZSRE = [
    # question ends in 'b': " cd" -> ' ' after b (wrong), 'c' after ' ' (wrong: succ is 'a'), 'd' after c (right)
    # paraphrase ends in 'z': " cd" -> ' ' after z (wrong: succ(z) is the newline), 'c' wrong, 'd' right
    # loc + "?": " bc" -> ' ' after '?' (right), 'b' after ' ' (wrong), 'c' after b (right)
    _zsre(0, "ab", "what is ab", "cd", "so xyz", "nq question who", "bc"),
    # "efg" after "...d": ' ' wrong, 'e' wrong, 'f' right, 'g' right -> 2/4; paraphrase "...?": ' ' right,
    # 'e' wrong, 'f' 'g' right -> 3/4; loc "...?": " a" -> ' ' right, 'a' right -> 1
    _zsre(1, "cd", "who is cd", "efg", "what?", "q", "a"),
]


def test_zsre_token_accuracy_hand_computed():
    res = evaluate_zsre(Bigram(), CharTok(), ZSRE)
    r0, r1 = res.records
    assert (r0.efficacy, r0.paraphrase, r0.specificity) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert (r1.efficacy, r1.paraphrase, r1.specificity) == pytest.approx((2 / 4, 3 / 4, 1.0))
    assert res.summary["zsre_es"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    assert res.summary["zsre_ps"] == pytest.approx(100 * (1 / 3 + 3 / 4) / 2)
    assert res.summary["zsre_ns"] == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_zsre_batched_equals_one_at_a_time():
    model = make_tiny_llama(vocab=V, seed=7)
    tok = CharTok()
    recs = ZSRE + [_zsre(2, "xy", "where is xy", "abc", "xy is in", "nq where", "z")]
    batched = evaluate_zsre(model, tok, recs, batch_size=64)
    for r, b in zip(recs, batched.records):
        one = evaluate_zsre(model, tok, [r], batch_size=1).records[0]
        assert one.to_dict() == b.to_dict()


def test_exact_match_normalisation():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("an Apple, a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # 'the' only as a word
    assert normalize_answer("A") == ""


GEN_CHARS = CHARS + string.ascii_uppercase + ".,!"


class GenTok(CharTok):
    """Characters in either case and some punctuation, and an EOS id after them (generate needs one)."""

    eos_token_id = pad_token_id = len(GEN_CHARS)

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [GEN_CHARS.index(c) for c in text]}

    def decode(self, ids, skip_special_tokens=False, **kw):
        return "".join(GEN_CHARS[i] for i in ids if i < len(GEN_CHARS))


def _gen_model(steer: dict | None = None):
    """Tiny random Llama; with ``steer`` {char: next char}, a bias of 100 on the logits makes the
    greedy next token a function of the current one (unlisted characters: EOS), so the text
    greedy decoding produces is known by hand."""
    n = len(GEN_CHARS) + 1
    model = make_tiny_llama(vocab=n, seed=8)
    model.generation_config.eos_token_id = n - 1
    if steer:
        bias = torch.zeros(n, n)
        bias[:, n - 1] = 100.0
        for c, nxt in steer.items():
            bias[GEN_CHARS.index(c)] = 0.0
            bias[GEN_CHARS.index(c), GEN_CHARS.index(nxt)] = 100.0
        seen = {}
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.__setitem__("ids", a[0]))
        model.lm_head.register_forward_hook(lambda m, a, out: out + bias[seen["ids"][:, -1]][:, None, :])
    return model


def test_exact_match_greedy_with_normalisation():
    # after "... is" the model writes " Par!" and stops
    model, tok = _gen_model({"s": " ", " ": "P", "P": "a", "a": "r", "r": "!"}), GenTok()
    targets = ["par!", "PAR", "the Pa", "Pa", "Paris"]
    recs = [EditRequest("{} is", "xy", t) for t in targets]
    res = evaluate_exact_match(model, tok, recs)
    # generation is as long as " " + target (stopping at EOS): " Par!", " Par", " Par!", " Pa", " Par!"
    assert [r["texts"][0] for r in res.records] == [" Par!", " Par", " Par!", " Pa", " Par!"]
    # normalised: "par" == "par" (case, punctuation), "par" == "par", "par" != "pa" (article gone,
    # text stopped), "pa" == "pa", "par" != "paris"
    assert [r["rewrite"] for r in res.records] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert res.summary["em_rewrite"] == pytest.approx(60.0)
    assert res.summary["em_paraphrase"] is None  # requests have no paraphrases
    one = [evaluate_exact_match(model, tok, [r]).records[0] for r in recs]
    assert [o["texts"] for o in one] == [r["texts"] for r in res.records]


def test_generate_under_group_updates_equals_copied_weights():
    model, tok = _gen_model(), GenTok()
    lin = model.model.layers[1].mlp.down_proj
    g = torch.Generator().manual_seed(0)
    D = torch.randn(lin.weight.shape[0], 2, generator=g) @ torch.randn(2, lin.weight.shape[1], generator=g)
    prompts = ["ab is", "cd was", "the x"]
    hooked = generate(model, tok, prompts, max_new_tokens=6, edits=GroupDeltas.from_deltas(lin, [D]),
                      row_edits=[0, -1, 0], return_ids=True)
    plain = generate(model, tok, prompts, max_new_tokens=6, return_ids=True)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(D)
    try:
        copied = generate(model, tok, prompts, max_new_tokens=6, return_ids=True)
    finally:
        with torch.no_grad():
            lin.weight.copy_(w0)
    assert hooked == [copied[0], plain[1], copied[2]]
    assert copied != plain  # the update changes what is generated: the comparison is not vacuous


def test_choice_scoring_sums_log_likelihoods_multi_token_label():
    task = Task("toy", "toy.jsonl", {"text": str, "label": int}, lambda r: r["text"],
                lambda r: [" abcdefg", " r"], lambda r: r["label"], positive=0)
    ex = [Example(0, "q", (" abcdefg", " r"), 1), Example(1, "f", (" abcdefg", " r"), 0)]
    res = score_task(Bigram(), CharTok(), task, ex)
    # " abcdefg" after 'q': ' ' wrong, then a..g each the successor: 1 wrong + 7 right; " r": 2 wrong
    want0 = [WRONG + 7 * RIGHT, 2 * WRONG]
    assert res.logprobs[0] == pytest.approx(want0, abs=1e-5)
    # summed: the long label loses (-14.3 < -7.1) although its mean per token is higher
    assert res.pred[0] == 1
    # after 'f': " abcdefg" as above; " r": ' ' wrong, 'r' wrong
    assert res.logprobs[1] == pytest.approx(want0, abs=1e-5) and res.pred[1] == 1
    assert res.summary["acc"] == 50.0
    # positive class 0: no predicted positives -> F1 0; predictions constant -> MCC 0
    assert res.summary["f1"] == 0.0 and res.summary["mcc"] == 0.0


def test_classification_scores_hand_computed():
    s = classification_scores([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], positive=1)
    tp, fp, fn, tn = 2, 1, 1, 1
    assert s["acc"] == pytest.approx(60.0)
    assert s["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    assert s["mcc"] == pytest.approx(100 * (tp * tn - fp * fn) / math.sqrt(3 * 3 * 2 * 2))
    assert "f1" not in classification_scores([0, 3], [0, 2])


def test_choice_scoring_batched_equals_one_at_a_time():
    model = make_tiny_llama(vocab=V, seed=9)
    task = Task("toy4", "toy.jsonl", {}, None, None, None)
    ex = [Example(i, p, (" a", " bc", " d", " efg"), i % 4) for i, p in enumerate(["what is", "so x", "q?", "abc d"])]
    batched = score_task(model, CharTok(), task, ex, batch_size=64)
    for i, e in enumerate(ex):
        one = score_task(model, CharTok(), task, [e], batch_size=1)
        assert one.pred == batched.pred[i : i + 1]
        assert one.logprobs[0] == pytest.approx(batched.logprobs[i], abs=1e-5)
    # few-shot: the first example becomes the worked example and is not scored
    shot = score_task(model, CharTok(), task, ex, shots=1)
    assert len(shot.pred) == 3 and shot.summary["shots"] == 1


def test_downstream_under_a_group_update_equals_copied_weights():
    model = make_tiny_llama(vocab=V, seed=10).double()
    lin = model.model.layers[1].mlp.down_proj
    g = torch.Generator().manual_seed(0)
    D = torch.randn(lin.weight.shape[0], 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, lin.weight.shape[1], generator=g, dtype=torch.float64)
    task = Task("toy4", "toy.jsonl", {}, None, None, None)
    ex = [Example(i, p, (" a", " bc"), i % 2) for i, p in enumerate(["what is", "so x", "q?"])]
    hooked = score_task(model, CharTok(), task, ex, edits=GroupDeltas.from_deltas(lin, [D]))
    with torch.no_grad():
        lin.weight.add_(D)
    ref = score_task(model, CharTok(), task, ex)
    for a, b in zip(hooked.logprobs, ref.logprobs):
        assert a == pytest.approx(b, abs=1e-10)


# ---------------------------------------------------------------------------------------
# data errors, shared data, registry


def test_load_task_errors_name_file_record_field(tmp_path):
    p = tmp_path / "sst2.jsonl"
    p.write_text(json.dumps({"sentence": "good", "label": 1}) + "\n" + json.dumps({"sentence": "bad"}) + "\n")
    with pytest.raises(ValueError, match=r"sst2\.jsonl: record 1: field 'label': missing"):
        load_task("sst2", path=p)
    p.write_text(json.dumps({"sentence": "good", "label": 3}) + "\n")
    with pytest.raises(ValueError, match=r"record 0: field 'label': label must be one of \[0, 1\], got 3"):
        load_task("sst2", path=p)
    p.write_text(json.dumps({"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(ValueError, match=r"record 0: field 'choices': expected 4 non-empty strings"):
        load_task("mmlu", path=p)
    with pytest.raises(ValueError, match="unknown downstream task 'nope'"):
        load_task("nope", path=p)


def test_jsonl_records_keep_unicode_line_separators(tmp_path):
    """JSON lines are split on \\n only: U+0085 / U+2028 inside a string (MMLU has one) are text."""
    from pmedit.fileio import read_json_records

    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"q": "a\x85b\u2028c"}, ensure_ascii=False) + "\n" + json.dumps({"q": "d"}) + "\n",
                 encoding="utf-8")
    assert read_json_records(p) == [{"q": "a\x85b\u2028c"}, {"q": "d"}]


@pytest.mark.parametrize("task", ["sst2", "sentiment", "mrpc", "cola", "rte", "nli", "mmlu", "dialogue"])
def test_shared_downstream_files_load(shared_data, task):
    ex = load_task(task, shared_data)
    assert len(ex) > 200
    n_choices = 4 if task in ("mmlu", "dialogue") else 2
    assert all(len(e.choices) == n_choices and 0 <= e.label < n_choices for e in ex)
    assert len({e.label for e in ex}) == n_choices  # every class occurs


def test_shared_zsre_and_registry(shared_data):
    recs = load_dataset("zsre", limit=3)
    assert recs[0].loc_prompt.startswith("nq question:")
    with pytest.raises(ValueError, match="metric set 'zsre' scores \\['zsre'\\], not dataset 'counterfact'"):
        check_metric_sets(["zsre"], "counterfact")


def test_registry_runs_metric_sets_and_checks_settings(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"prompt": "{} is", "subject": "ab", "target_new": "cd"}]))
    recs = load_dataset("requests", p)
    out = run_metric_sets(_gen_model(), GenTok(), recs, ["exact_match"], dataset="requests")
    assert set(out) == {"n_records", "em_rewrite", "em_paraphrase", "exact_match_seconds"}
    with pytest.raises(ValueError, match=r"metric set 'exact_match': unknown setting\(s\) \['bogus'\]"):
        check_metric_sets(["exact_match"], "requests", {"exact_match": {"bogus": 1}})
    with pytest.raises(ValueError, match="unknown metric set 'nope'"):
        check_metric_sets(["nope"], "requests")
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("requests")
    assert {"counterfact", "zsre", "exact_match", "downstream", "perplexity"} <= set(METRIC_SETS)
