"""One tokenisation path: with a tokenizer that prepends BOS (built here, no download), value
optimisation and scoring see the same prompt and target ids, and padding follows one rule."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from pmedit.data import CounterFactRecord
from pmedit.evaluation import encode_pair, evaluate_counterfact, score_targets
from pmedit.models import ModelSpec
from pmedit.requests import EditRequest
from pmedit.tokens import pad_batch, pad_id
from pmedit.values import optimize_values

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

CORPUS = [
    "The mother tongue of Danielle Darrieux is French.", "Danielle Darrieux plays for Real Madrid.",
    "English is a language.", "The capital of France is Paris.", "Football is played in Madrid and Paris.",
    "She is a French actress who plays in films.", "The city of London is in England.",
] * 4


@pytest.fixture(scope="module")
def bos_tok():
    """A byte-level BPE (spaces belong to the next word, as in Llama/GPT-2) whose post-processor
    prepends <s> to every encoded text, as Llama-3's does."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, trainer)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", t.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")
    assert tok("English")["input_ids"][0] == tok.bos_token_id  # really prepends BOS
    assert tok.pad_token_id is None  # so pad_id falls back to EOS
    return tok


REQS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=0),
    # trailing whitespace in the prompt: scoring must not tokenise "is " + " Paris"
    EditRequest("{} plays for ", "Danielle Darrieux", "Real Madrid", "Paris", case_id=1),
    EditRequest("The capital of {} is", "France", " London", "Paris", case_id=2),  # target with its own space
]


def _records():
    return [CounterFactRecord(case_id=r.case_id, subject=r.subject, prompt=r.prompt, target_new=r.target_new,
                              target_true=r.target_true, neighborhood_target=r.target_true) for r in REQS]


def _inputs(model, fn):
    seen = []
    emb = model.get_input_embeddings()
    h = emb.register_forward_pre_hook(lambda m, args: seen.extend(args[0].tolist()))
    try:
        out = fn()
    finally:
        h.remove()
    return out, seen


def test_values_and_scoring_see_identical_ids(bos_tok):
    tok = bos_tok
    model = make_tiny_llama(vocab=len(tok), seed=4)
    spec = ModelSpec.from_model(model)
    bos = tok.bos_token_id
    # steps=0: the reported loss is the unedited NLL of target_new after the bare prompt
    res, v_rows = _inputs(model, lambda: optimize_values(model, tok, spec, 1, REQS, [], steps=0))
    _, e_rows = _inputs(model, lambda: evaluate_counterfact(model, tok, _records(), progress=False))
    pad = pad_id(tok)
    strip = lambda row: row[: max(i for i, t in enumerate(row) if t != pad) + 1]  # noqa: E731
    v_rows, e_rows = [strip(r) for r in v_rows], [strip(r) for r in e_rows]
    for i, r in enumerate(REQS):
        p, t = encode_pair(tok, r.filled_prompt, r.target_new)
        assert p[0] == bos and bos not in p[1:] and bos not in t and tok.eos_token_id not in t
        assert tok.decode(t) == " " + r.target_new.strip()
        # value optimisation's rewrite row is prompt + target[:-1]; scoring's packed row is prompt +
        # target_new + target_true: the same prompt and target ids on both sides
        assert p + t[:-1] in v_rows
        assert any(row[: len(p) + len(t)] == p + t for row in e_rows)
    # and the same numbers: value optimisation's NLL of target_new is the scorer's (fp32 both sides)
    pairs = [encode_pair(tok, r.filled_prompt, r.target_new) for r in REQS]
    nll, _ = score_targets(model, tok, pairs)
    torch.testing.assert_close(nll.float(), res.losses, atol=1e-5, rtol=1e-5)
    # the trailing-space prompt really would tokenise differently if scoring used tok(prompt)
    assert tok(REQS[1].filled_prompt)["input_ids"] != pairs[1][0]


def test_pad_batch_right_and_left():
    ids, mask = pad_batch([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], 9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")


def test_pad_id_rule():
    class T:
        pad_token_id, eos_token_id = None, 7
    assert pad_id(T()) == 7
    T.pad_token_id = 3
    assert pad_id(T()) == 3
    assert pad_id(object()) == 0
