"""EditHparams: validation names the culprit, round trips are exact, presets are valid."""
from __future__ import annotations

import dataclasses

import pytest

from pmedit.hparams import PRESETS, EditHparams


def test_defaults_follow_the_papers():
    hp = EditHparams(layers=[4])
    assert hp.layers == (4,)  # lists become tuples: the object is hashable and frozen
    assert (hp.method, hp.lr, hp.steps, hp.kl_factor, hp.n_templates, hp.template_length) == (
        "emmet", 0.5, 25, 0.0625, 5, 10)
    assert hp.mom2_corpus == "wiki-offline"
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.lr = 1.0  # type: ignore[misc]


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        EditHparams.from_dict({"layers": [1], "v_lr": 0.5})
    msg = str(e.value)
    assert "'v_lr'" in msg and "lr" in msg and "clamp_norm_factor" in msg and "keep_prior_edits" in msg


def test_missing_layers_is_named():
    with pytest.raises(ValueError, match="'layers'"):
        EditHparams.from_dict({"method": "memit"})


@pytest.mark.parametrize(
    "change, field",
    [
        ({"layers": []}, "layers"),
        ({"layers": [5, 3]}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": [1.5]}, "layers"),
        ({"method": "ft"}, "method"),
        ({"method": "rome", "layers": [1, 2]}, "layers"),
        ({"steps": 2.5}, "steps"),
        ({"steps": -1}, "steps"),
        ({"steps": True}, "steps"),
        ({"lr": 0}, "lr"),
        ({"lr": "0.5"}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lam": 0.0}, "lam"),
        ({"lam_e": -0.1}, "lam_e"),
        ({"keep_prior_edits": 1}, "keep_prior_edits"),
        ({"precision": "fp16"}, "precision"),
        ({"mom2_dtype": "bfloat16"}, "mom2_dtype"),
        ({"value_batch_size": 0}, "value_batch_size"),
        ({"mom2_corpus": " "}, "mom2_corpus"),
    ],
)
def test_bad_values_name_the_field(change, field):
    data = {"layers": [3], **change}
    with pytest.raises(ValueError, match=f"'{field}'"):
        EditHparams.from_dict(data)


def test_ints_are_accepted_for_floats():
    assert EditHparams.from_dict({"layers": [1], "lam": 15000}).lam == 15000


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_file_round_trip(tmp_path, suffix):
    hp = EditHparams(layers=[2, 3, 4], method="memit", lam=15000.0, keep_prior_edits=True, stop_on_argmax=True)
    path = tmp_path / f"hp{suffix}"
    hp.save(path)
    assert EditHparams.load(path) == hp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp file replaced


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"layers": [1], "lamda": 2}')
    with pytest.raises(ValueError, match="bad.json.*'lamda'"):
        EditHparams.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: invalid JSON at line 1"):
        EditHparams.load(path)


def test_replace_validates():
    hp = EditHparams(layers=[1])
    assert hp.replace(lam_e=0.0).lam_e == 0.0
    with pytest.raises(ValueError, match="unknown key"):
        hp.replace(lam_ee=0.0)
    with pytest.raises(ValueError, match="'lr'"):
        hp.replace(lr=-1.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    hp = EditHparams.preset(name)
    assert EditHparams.from_json(hp.to_json()) == hp
    assert EditHparams.preset(name, steps=3).steps == 3


def test_llama3_preset_edits_layer_1():
    assert EditHparams.preset("llama3-8b").layers == (1,)


def test_unknown_preset():
    with pytest.raises(ValueError, match="available: llama3-8b, smollm2"):
        EditHparams.preset("gpt2")
