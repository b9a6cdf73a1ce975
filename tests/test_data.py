"""pmedit.data: both CounterFact layouts into one record type, zsRE, and the bad-file errors."""
from __future__ import annotations

import copy
import json

import pytest

from pmedit.data import CounterFactRecord, fill, load_counterfact, load_zsre, select

ORIGINAL = {
    "case_id": 7,
    "pararel_idx": 1,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Who? Danielle Darrieux spoke", "Danielle Darrieux's first language is"],
    "neighborhood_prompts": ["Jean Gabin's mother tongue is"] * 3,
    "attribute_prompts": ["Tom Hanks speaks"],
    "generation_prompts": ["Danielle Darrieux was born in", "Danielle Darrieux often says"],
}

REDUCED = {
    "case_id": 10,
    "prompt": "BBC One, by",
    "target_new": "Sega",
    "subject": "BBC One",
    "ground_truth": "BBC",
    "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
    "locality_prompt": "BBC Radio, by",
    "locality_ground_truth": "BBC",
}

ZSRE = {
    "subject": "Charity Creek",
    "src": "Which river system contains Charity Creek?",
    "pred": "Parramatta River",
    "rephrase": "What river system is Charity Creek in?",
    "alt": "Chichester River",
    "answers": ["Parramatta River"],
    "loc": "nq question: how many series of diary of a wimpy kid are there",
    "loc_ans": "12",
    "cond": "x",
}


def _write(tmp_path, records, name="cf.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


def test_original_layout(tmp_path):
    (r,) = load_counterfact(_write(tmp_path, [ORIGINAL]))
    assert isinstance(r, CounterFactRecord) and r.layout == "original"
    assert r.case_id == 7 and r.subject == "Danielle Darrieux"
    assert r.prompt == "The mother tongue of {} is"
    assert r.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target_new, r.target_true, r.neighborhood_target) == ("English", "French", "French")
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 3
    assert r.attribute_prompts == ("Tom Hanks speaks",) and len(r.generation_prompts) == 2
    assert (r.relation_id, r.target_new_id, r.target_true_id) == ("P103", "Q1860", "Q150")
    assert r.as_memit_dict()["target_new"] == {"str": "English"}


def test_reduced_layout(tmp_path):
    (r,) = load_counterfact(_write(tmp_path, [REDUCED]))
    assert r.layout == "reduced"
    assert r.prompt == "{}, by" and r.rewrite_prompt == "BBC One, by"
    assert (r.target_new, r.target_true, r.neighborhood_target) == ("Sega", "BBC", "BBC")
    assert r.paraphrase_prompts == ("BBC One is my favorite product out of everything owned by",)
    assert r.neighborhood_prompts == ("BBC Radio, by",)
    # what the reduced layout lacks is empty, not missing
    assert r.attribute_prompts == () and r.generation_prompts == ()


def test_jsonl_and_limit(tmp_path):
    recs = [dict(REDUCED, case_id=i) for i in range(5)]
    p = tmp_path / "cf.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert [r.case_id for r in load_counterfact(p, limit=3)] == [0, 1, 2]


def test_prompt_with_braces_is_filled_literally(tmp_path):
    rec = copy.deepcopy(ORIGINAL)
    rec["requested_rewrite"]["prompt"] = "In {x} terms, {} speaks"
    (r,) = load_counterfact(_write(tmp_path, [rec]))
    assert r.rewrite_prompt == "In {x} terms, Danielle Darrieux speaks"
    assert fill("{} and {}", "A") == "A and {}"


def _bad_original(mutate):
    rec = copy.deepcopy(ORIGINAL)
    mutate(rec)
    return rec


@pytest.mark.parametrize(
    "records, field, words",
    [
        ([_bad_original(lambda r: r["requested_rewrite"].pop("subject"))], "requested_rewrite.subject", "missing"),
        ([_bad_original(lambda r: r.pop("requested_rewrite") and r.update(prompt="x {}"))], "subject", "missing"),
        ([_bad_original(lambda r: r["requested_rewrite"]["target_new"].update(str=3))], "requested_rewrite.target_new.str", "expected str, got int"),
        ([_bad_original(lambda r: r.update(case_id="7"))], "case_id", "expected int, got str"),
        ([_bad_original(lambda r: r.update(case_id=True))], "case_id", "got bool"),
        ([_bad_original(lambda r: r.update(neighborhood_prompts="one"))], "neighborhood_prompts", "expected list"),
        ([_bad_original(lambda r: r["paraphrase_prompts"].append(None))], "paraphrase_prompts[2]", "expected str"),
        ([_bad_original(lambda r: r["requested_rewrite"].update(prompt="The mother tongue is"))], "requested_rewrite.prompt", "slot for its subject"),
        ([dict(REDUCED, prompt="Sega makes")], "prompt", "does not contain its subject"),
        ([dict(REDUCED, ground_truth="")], "ground_truth", "empty"),
        ([ORIGINAL, dict(REDUCED, case_id=7)], "case_id", "duplicate case_id 7 (first at record 0)"),
    ],
)
def test_bad_counterfact_files(tmp_path, records, field, words):
    p = _write(tmp_path, records, "bad.json")
    with pytest.raises(ValueError) as ei:
        load_counterfact(p)
    msg = str(ei.value)
    index = len(records) - 1
    assert str(p) in msg and f"record {index}" in msg and f"field {field!r}" in msg and words in msg, msg


def test_bad_file_shapes(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"case_id": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_counterfact(p)
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"record 0: expected a JSON object"):
        load_counterfact(p)
    p.write_text("[{")
    with pytest.raises(ValueError, match=r"x\.json: invalid JSON"):
        load_counterfact(p)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_counterfact(tmp_path / "nope.json")


def test_zsre(tmp_path):
    (r,) = load_zsre(_write(tmp_path, [ZSRE], "z.json"))
    assert r.case_id == 0 and r.prompt == "Which river system contains {}?"
    assert r.target_new == "Parramatta River" and r.alt == "Chichester River"
    assert r.paraphrase_prompts == ("What river system is Charity Creek in?",)
    assert (r.loc_prompt, r.loc_answer) == (ZSRE["loc"], "12")
    bad = [ZSRE, dict(ZSRE, src="Which river?")]
    with pytest.raises(ValueError, match=r"record 1: field 'src': .*does not contain its subject"):
        load_zsre(_write(tmp_path, bad, "zb.json"))
    with pytest.raises(ValueError, match=r"record 0: field 'answers': empty list"):
        load_zsre(_write(tmp_path, [dict(ZSRE, answers=[])], "zc.json"))


def test_select_is_seeded_and_stable():
    recs = list(range(100))
    a, b = select(recs, 10, seed=3), select(recs, 10, seed=3)
    assert a == b and a != select(recs, 10, seed=4) and a == sorted(a)
    assert select(recs, 5) == [0, 1, 2, 3, 4] and len(select(recs, 1000)) == 100


def test_shared_files(shared_data):
    orig = load_counterfact(shared_data / "counterfact" / "counterfact_original_500.json")
    assert len(orig) == 500 and all(r.layout == "original" for r in orig)
    assert all(len(r.neighborhood_prompts) == 10 and len(r.generation_prompts) == 10 for r in orig)
    red = load_counterfact(shared_data / "counterfact" / "locft_counterfact_3k.json")
    assert len(red) == 3000 and all(r.subject in r.rewrite_prompt for r in red)
    z = load_zsre(shared_data / "zsre" / "locft_zsre_3k.json")
    assert len(z) == 3000
