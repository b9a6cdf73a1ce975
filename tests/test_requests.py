"""Edit requests (every input layout, validation) and the tokenization pitfalls of pmedit.tokens."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pmedit.requests import EditRequest, drop_conflicts, normalize_requests
from pmedit.tokens import (
    encode_kl_prompt,
    encode_prompt,
    encode_rewrite,
    encode_subject_prompt,
    encode_target,
    fill_template,
    split_target,
)

DARRIEUX = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=0)


# ----------------------------------------------------------------------------------------
# layouts


def test_all_layouts_give_the_same_request():
    memit = {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "case_id": 0,
    }
    original = {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {**memit, "relation_id": "P103"},
        "paraphrase_prompts": ["x"],
    }
    del original["requested_rewrite"]["case_id"]
    reduced = {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    }
    got = normalize_requests([DARRIEUX, memit, original, reduced])
    assert got == [DARRIEUX] * 4
    assert normalize_requests(memit) == [DARRIEUX]  # a single request is a list of one
    assert DARRIEUX.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert DARRIEUX.filled_prompt[slice(*DARRIEUX.subject_span)] == "Danielle Darrieux"
    assert normalize_requests([DARRIEUX.to_dict()]) == [DARRIEUX]
    assert json.loads(json.dumps(DARRIEUX.to_dict())) == DARRIEUX.to_dict()


def test_filled_prompt_becomes_template_and_braces_elsewhere_are_literal():
    r = EditRequest("{a} Danielle Darrieux, whose {x}", "Danielle Darrieux", "English")
    assert r.prompt == "{a} {}, whose {x}"
    assert r.filled_prompt == "{a} Danielle Darrieux, whose {x}"
    r = EditRequest("The symbol of {} is", "C{}++", "Bjarne")  # a subject with braces
    assert r.filled_prompt == "The symbol of C{}++ is"


def test_real_counterfact_files_normalize(shared_data):
    cf = shared_data / "counterfact"
    reduced = json.loads((cf / "easyedit_counterfact-edit.json").read_text())[:200]
    original = json.loads((cf / "counterfact_original_500.json").read_text())[:50]
    reqs = normalize_requests(reduced)
    assert [r.case_id for r in reqs] == [r["case_id"] for r in reduced]
    assert all(r.filled_prompt == rec["prompt"] for r, rec in zip(reqs, reduced))
    reqs = normalize_requests(original)
    assert all(r.prompt == rec["requested_rewrite"]["prompt"] for r, rec in zip(reqs, original))
    assert all(r.target_true == rec["requested_rewrite"]["target_true"]["str"] for r, rec in zip(reqs, original))


# ----------------------------------------------------------------------------------------
# validation: one ValueError naming the request (index, case_id) and the field

GOOD = {"prompt": "{} was born in", "subject": "Alan Turing", "target_new": "Paris", "case_id": "ok"}


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"prompt": "Turing was born in"}, "prompt", "no '{}' placeholder"),
        ({"prompt": "{} met {} in"}, "prompt", "2 '{}' placeholders"),
        ({"subject": ""}, "subject", "empty subject"),
        ({"subject": "   "}, "subject", "empty subject"),
        ({"target_new": ""}, "target_new", "empty target"),
        ({"target_new": {"str": " "}}, "target_new", "empty target"),
        ({"target_true": "Paris"}, "target_new", "equals target_true"),
        ({"target_true": {"str": "Paris"}}, "target_new", "equals target_true"),
        ({"subject": 42}, "subject", "expected a string"),
        ({"prompt": None}, "prompt", "expected a string"),
        ({"target_new": ["Paris"]}, "target_new", "expected a string"),
        ({"target_true": 3.5}, "target_true", "expected a string or None"),
        ({"prompt": "{}"}, "prompt", "no text besides the subject"),
    ],
)
def test_validation_names_request_and_field(change, field, words):
    bad = {**GOOD, **change, "case_id": 1234}
    with pytest.raises(ValueError) as e:
        normalize_requests([GOOD, GOOD, bad])
    msg = str(e.value)
    assert msg.startswith("request 2 (case_id=1234): "), msg
    assert f"field {field!r}" in msg and words in msg, msg


def test_validation_other_inputs():
    with pytest.raises(ValueError, match=r"request 1 \(case_id=None\): field 'subject': missing"):
        normalize_requests([GOOD, {"prompt": "{} is", "target_new": "x"}])
    with pytest.raises(ValueError, match=r"request 0: expected an EditRequest, a dict or a pmedit.data record, got str"):
        normalize_requests(["The mother tongue"])
    with pytest.raises(ValueError, match="got a string"):
        normalize_requests("The mother tongue")
    with pytest.raises(ValueError, match=r"request \(case_id=7\): field 'subject': empty"):
        EditRequest("{} is", "", "x", case_id=7)
    with pytest.raises(ValueError, match="field 'requested_rewrite'"):
        normalize_requests([{"case_id": 3, "requested_rewrite": "oops"}])
    assert normalize_requests([]) == []


# ----------------------------------------------------------------------------------------
# tokenization pitfalls, with SmolLM2's tokenizer (adds no BOS) and a copy that adds BOS the
# way Llama-3's does (a post-processor prepending the BOS id on every call with
# add_special_tokens=True)


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def bos_tok(tok):
    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    bos = t.bos_token
    t._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, t.bos_token_id)]
    )
    assert t("Hello")["input_ids"][0] == t.bos_token_id  # the copy really behaves like Llama-3's
    return t


class StubbornBOS:
    """A tokenizer that prepends BOS and appends EOS even with add_special_tokens=False (some
    slow tokenizers and wrappers do): target ids must still come out clean."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_token_id, self.eos_token_id = tok.bos_token_id, tok.eos_token_id
        self.all_special_ids = tok.all_special_ids

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": [self.bos_token_id, *ids, self.eos_token_id]}

    def convert_ids_to_tokens(self, i):
        return self.tok.convert_ids_to_tokens(i)

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


def test_smollm2_adds_no_bos(tok):
    assert tok("The")["input_ids"] == tok("The", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("which", ["plain", "bos", "stubborn"])
def test_target_ids_never_include_bos_or_eos(tok, bos_tok, which):
    t = {"plain": tok, "bos": bos_tok, "stubborn": StubbornBOS(tok)}[which]
    want = tok(" English", add_special_tokens=False)["input_ids"]
    got = encode_target(t, " English")
    assert got == want
    assert tok.bos_token_id not in got and tok.eos_token_id not in got
    e = encode_rewrite(t, DARRIEUX, None)
    assert e.target_ids == want
    assert tok.bos_token_id not in e.ids[1:]  # BOS at most at position 0 of the model input
    # The prompt keeps the BOS a tokenizer prepends (the model was trained with it).
    assert (e.ids[0] == tok.bos_token_id) == (which != "plain")
    assert tok.eos_token_id not in e.ids


@pytest.mark.parametrize("use_bos", [False, True])
def test_leading_space_convention(tok, bos_tok, use_bos):
    t = bos_tok if use_bos else tok
    assert split_target("The mother tongue of X is", "English") == ("The mother tongue of X is", " English")
    assert split_target("The mother tongue of X is ", "English") == ("The mother tongue of X is", " English")
    assert split_target("X is", " English") == ("X is", " English")
    e = encode_rewrite(t, DARRIEUX, None)
    joint = t("The mother tongue of Danielle Darrieux is English")["input_ids"]
    # prompt ids + target ids are exactly the running-text tokenization, and the scored
    # position is the last prompt token.
    assert e.ids + e.target_ids[-1:] == joint
    assert e.first_scored == len(joint) - len(e.target_ids) - 1
    assert tok.convert_ids_to_tokens(e.target_ids) == ["ĠEnglish"]
    same = encode_rewrite(t, EditRequest("The mother tongue of {} is ", "Danielle Darrieux", "English"), None)
    assert same == e


@pytest.mark.parametrize("use_bos", [False, True])
def test_subject_at_start_of_prompt(tok, bos_tok, use_bos):
    t = bos_tok if use_bos else tok
    r = EditRequest("{} was born in", "Turing", "London")
    p = encode_subject_prompt(t, r, None)
    n_subject = len(tok("Turing", add_special_tokens=False)["input_ids"])
    assert p.subject_last == n_subject - 1 + (1 if use_bos else 0)
    assert t.decode(p.ids[: p.subject_last + 1], skip_special_tokens=True) == "Turing"
    assert t.convert_ids_to_tokens(p.ids[p.subject_last + 1]) == "Ġwas"
    # After a context template the subject is preceded by ". " and keeps its position.
    p = encode_subject_prompt(t, r, "Something happened. {}")
    assert t.decode(p.ids[: p.subject_last + 1], skip_special_tokens=True) == "Something happened. Turing"
    assert t.convert_ids_to_tokens(p.ids[p.subject_last + 1]) == "Ġwas"


@pytest.mark.parametrize("use_bos", [False, True])
def test_multi_token_subject_and_target(tok, bos_tok, use_bos):
    t = bos_tok if use_bos else tok
    r = EditRequest("{} plays for", "Danielle Darrieux", "Real Madrid Club de Fútbol")
    e = encode_rewrite(t, r, None)
    subj = t.convert_ids_to_tokens(e.ids[: e.subject_last + 1])
    assert "".join(subj).replace("Ġ", " ").endswith("Danielle Darrieux")
    assert t.convert_ids_to_tokens(e.ids[e.subject_last + 1]) == "Ġplays"
    assert t.decode(e.target_ids) == " Real Madrid Club de Fútbol"
    assert len(e.target_ids) > 3
    assert e.ids[e.first_scored + 1:] == e.target_ids[:-1]  # the model sees all but the last target id


@pytest.mark.parametrize("use_bos", [False, True])
def test_non_ascii(tok, bos_tok, use_bos):
    t = bos_tok if use_bos else tok
    r = EditRequest("{} a été fondée à", "Société Générale", "São Paulo", "Paris")
    e = encode_rewrite(t, r, None)
    subj = t.decode(e.ids[: e.subject_last + 1], skip_special_tokens=True)
    assert subj == "Société Générale"
    assert t.decode(e.target_ids) == " São Paulo"
    r = EditRequest("東京の{}は", "東京タワー", "赤い")  # no spaces in the text at all
    e = encode_rewrite(t, r, None)
    assert t.decode(e.ids[: e.subject_last + 1], skip_special_tokens=True) == "東京の東京タワー"
    assert t.decode(e.target_ids).strip() == "赤い"


def test_subject_merged_with_following_text(tok):
    # "playe" + "d" is one token " played": the subject's last token is the merged one. Tokenizing
    # the prefix "Football is playe" alone would give [.., " play", "e"] and point one token too far.
    r = EditRequest("{}d in Brazil", "Football is playe", "rarely")
    prefix = tok("Football is playe")["input_ids"]
    full = tok("Football is played in Brazil")["input_ids"]
    assert prefix != full[: len(prefix)]  # the pitfall is real for this tokenizer
    p = encode_subject_prompt(tok, r, None)
    assert tok.convert_ids_to_tokens(p.ids[p.subject_last]) == "Ġplayed"


def test_decode_fallback_matches_offsets(tok):
    # Slow tokenizers have no offsets: the decode-based search must agree with the offset one.
    from pmedit import tokens

    class NoOffsets(StubbornBOS):
        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError
            return self.tok(text, add_special_tokens=add_special_tokens)

    for text, end in [("Danielle Darrieux was born", 17), ("Société Générale a été", 16), ("Football is played", 17)]:
        a = encode_prompt(tok, text, end)
        b = encode_prompt(NoOffsets(tok), text, end)
        assert a == b, (text, a, b)
        assert tokens._own_ids(NoOffsets(tok), text, offsets=True)[1] is None


def test_kl_prompt_and_templates(tok):
    p = encode_kl_prompt(tok, "Danielle Darrieux")
    assert tok.decode(p.ids) == "Danielle Darrieux is a"
    assert tok.convert_ids_to_tokens(p.ids[p.subject_last]) == "ux"
    assert fill_template("A {{b}} c. {}", "X is") == ("A {b} c. X is", 9)
    with pytest.raises(ValueError, match="exactly one"):
        fill_template("no field", "x")
    with pytest.raises(ValueError, match="only a bare"):
        fill_template("{name}", "x")
    e = encode_rewrite(tok, DARRIEUX, "I think {{so}}. {}")
    assert tok.decode(e.ids) == "I think {so}. The mother tongue of Danielle Darrieux is"
    assert tok.convert_ids_to_tokens(e.ids[e.subject_last]) == "ux"


# ----------------------------------------------------------------------------------------
# issue 14: hostile inputs (items 4, 5, 10, 11, 12)


def test_conflicting_targets_for_one_prompt_are_rejected_naming_both():
    a = {"prompt": "{} is located in", "subject": "Eiffel Tower", "target_new": "Rome", "case_id": 10}
    b = {**a, "target_new": "Berlin", "case_id": 11}
    with pytest.raises(ValueError) as e:
        normalize_requests([GOOD, a, GOOD, b])
    msg = str(e.value)
    assert msg.startswith("request 3 (case_id=11): field 'target_new': 'Berlin' conflicts with request 1 (case_id=10)")
    assert "'Rome'" in msg and "drop_conflicts" in msg
    # the filled-in layout is the same request, so the same conflict
    with pytest.raises(ValueError, match=r"request 1 .* conflicts with request 0"):
        normalize_requests([a, {**b, "prompt": "Eiffel Tower is located in"}])
    # an exact repeat is the same constraint twice (documented rule: allowed), another prompt
    # or another subject is another fact
    assert len(normalize_requests([a, dict(a), {**b, "prompt": "{} stands in"}, {**b, "subject": "Big Ben"}])) == 4
    kept, dropped = drop_conflicts([a, GOOD, b, dict(a)])
    assert dropped == [2] and [r.case_id for r in kept] == [10, "ok", 10]


def test_lone_surrogates_are_rejected_before_tokenization():
    # json.loads accepts "\ud800" and gives a str that no tokenizer (or UTF-8 encoder) accepts
    text = json.loads('"Danielle \\ud800Darrieux"')
    for fld, change in [("subject", {"subject": text, "prompt": "{} was born in"}),
                        ("prompt", {"prompt": "{} was born in \udfff"}),
                        ("target_new", {"target_new": "Par\ud83dis"}),
                        ("target_true", {"target_true": "\udc80"})]:
        with pytest.raises(ValueError) as e:
            normalize_requests([GOOD, {**GOOD, **change, "case_id": 5}])
        msg = str(e.value)
        assert msg.startswith(f"request 1 (case_id=5): field {fld!r}: not valid Unicode"), msg
        assert "lone surrogate" in msg
        msg.encode("utf-8")  # the message itself prints on any terminal
    assert EditRequest("{} a été fondée à", "Société Générale", "São Paulo 🚀").target_new.endswith("🚀")


def test_subject_containing_the_placeholder_in_a_filled_prompt():
    r = EditRequest("The symbol of C{}++ is", "C{}++", "Bjarne")
    assert r.prompt == "The symbol of {} is"
    assert r.filled_prompt == "The symbol of C{}++ is"
    assert r.filled_prompt[slice(*r.subject_span)] == "C{}++"
    assert normalize_requests([r]) == [r]  # stable under re-normalization
    (d,) = normalize_requests([{"prompt": "The symbol of C{}++ is", "subject": "C{}++", "target_new": "Bjarne"}])
    assert d == r
    with pytest.raises(ValueError, match=r"field 'prompt': has '\{\}' besides the subject"):
        EditRequest("{} and C{}++ are languages", "C{}++", "old")


def test_subject_and_prompt_lengths_are_bounded():
    from pmedit.requests import MAX_PROMPT_CHARS, MAX_SUBJECT_CHARS

    long_subject = " ".join(["word"] * 3000)
    with pytest.raises(ValueError, match=rf"request 1 \(case_id='ok'\): field 'subject': 14999 characters .*"
                                         rf"at most {MAX_SUBJECT_CHARS}"):
        normalize_requests([GOOD, {**GOOD, "subject": long_subject}])
    with pytest.raises(ValueError, match=rf"field 'prompt': {MAX_PROMPT_CHARS + 1} characters"):
        EditRequest("{}" + "x" * (MAX_PROMPT_CHARS - 4), "abcde", "y")
    assert EditRequest("{}" + "x" * (MAX_PROMPT_CHARS - 5), "abcde", "y")  # at the limit


def _cf_record(case_id=0):
    from pmedit.data import CounterFactRecord

    return CounterFactRecord(case_id=case_id, subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                             target_new="English", target_true="French")


def test_loader_records_are_accepted():
    from pmedit.data import ZsreRecord

    cf = _cf_record()
    zs = ZsreRecord(case_id=3, subject="Watts Humphrey", prompt="What university did {} attend?",
                    target_new="Trinity College", answers=("Trinity College",), alt="Duke", pred="Harvard",
                    paraphrase_prompts=("x",), loc_prompt="nq question: who", loc_answer="me")
    got = normalize_requests([cf, zs, DARRIEUX.to_dict()])
    assert got[0] == DARRIEUX and got[2] == DARRIEUX
    assert got[1] == EditRequest("What university did {} attend?", "Watts Humphrey", "Trinity College", case_id=3)
    assert normalize_requests(cf) == [DARRIEUX]  # a single record is a list of one
    with pytest.raises(ValueError, match=r"request 0: expected an EditRequest, a dict or a pmedit.data record, got int"):
        normalize_requests([7])


def test_loaded_files_feed_normalize_requests(shared_data):
    from pmedit.data import load_counterfact, load_zsre

    cf = load_counterfact(shared_data / "counterfact" / "counterfact_original_500.json", limit=20)
    assert [r.case_id for r in normalize_requests(cf)] == [r.case_id for r in cf]
    zs = load_zsre(shared_data / "zsre" / "locft_zsre_3k.json", limit=20)
    reqs = normalize_requests(zs)
    assert [r.filled_prompt for r in reqs] == [r.rewrite_prompt for r in zs]
    big = load_counterfact(shared_data / "counterfact" / "easyedit_counterfact-edit.json")
    with pytest.raises(ValueError, match="conflicts with"):
        normalize_requests(big)
    kept, dropped = drop_conflicts(big)
    assert len(kept) + len(dropped) == len(big) and 0 < len(dropped) < 100
    assert normalize_requests(kept) == kept


def test_compute_keys_takes_counterfact_records(smollm2):
    from pmedit.keys import compute_keys
    from pmedit.models import ModelSpec

    model, tok = smollm2
    spec = ModelSpec.from_model(model)
    a = compute_keys(model, tok, spec, 1, [_cf_record()], ["A day. {}"])
    b = compute_keys(model, tok, spec, 1, [DARRIEUX], ["A day. {}"])
    assert torch.equal(a, b)
