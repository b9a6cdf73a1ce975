"""The method registry: one method list for the whole code base, each method's own
hyperparameters, presets and λ-sweep field, and the report's convergence warning."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from conftest import make_tiny_llama
from pmedit.hparams import EditHparams
from pmedit.methods import get_method, method_names, methods
from test_editor import Synthetic, _requests, _tiny_editor


def test_every_consumer_reads_the_registry(tmp_path):
    from pmedit.commands.edit import add_arguments
    from pmedit.experiments import ExperimentConfig

    names = method_names()
    assert {"rome", "memit", "emmet"} <= set(names)
    p = argparse.ArgumentParser()
    add_arguments(p)
    (action,) = [a for a in p._actions if a.dest == "method"]
    assert tuple(action.choices) == names
    for name in names:
        m = get_method(name)
        assert m.name == name and m.hparams.method_name() == name
        assert m.sweep_field in {f.name for f in dataclasses.fields(m.hparams)}
        hp = EditHparams(layers=[1], method=name)
        assert type(hp) is m.hparams
        ExperimentConfig.from_dict(dict(experiment="batch", data=str(tmp_path / "x.json"), layers=[1],
                                        methods=[name], total_edits=2, batch_sizes=[2], preset=None))
    with pytest.raises(ValueError, match="unknown method 'mend'; choose one of rome, memit, emmet"):
        get_method("mend")
    assert list(methods()) == list(names)


def test_memit_has_no_lambda_e():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lam_e'\]"):
        EditHparams.from_dict({"layers": [1], "method": "memit", "lam_e": 0.1})
    with pytest.raises(TypeError, match="lam_e"):
        EditHparams(layers=[1], method="memit", lam_e=0.1)
    emmet = EditHparams.preset("smollm2")
    assert (emmet.method, emmet.lam_e, emmet.lam) == ("emmet", 0.1, 100.0)
    # switching method keeps the shared fields and drops the other method's own ones ...
    memit = emmet.replace(method="memit", steps=3)
    assert memit.method == "memit" and memit.steps == 3 and memit.lam == 100.0 and not hasattr(memit, "lam_e")
    # ... unless they are asked for, which is an error naming the field
    with pytest.raises(ValueError, match=r"\['lam_e'\]"):
        emmet.replace(method="memit", lam_e=0.5)
    assert EditHparams.preset("smollm2", method="memit") == memit.replace(steps=emmet.steps)
    with pytest.raises(ValueError, match="exactly one layer"):
        EditHparams(layers=[1, 2], method="rome")
    with pytest.raises(ValueError, match="lam_e"):
        EditHparams(layers=[1], lam_e=-1.0)


def test_hparams_files_round_trip_per_method(tmp_path):
    for name in method_names():
        hp = EditHparams.preset("smollm2", method=name, steps=7)
        for ext in ("json", "yaml"):
            f = tmp_path / f"{name}.{ext}"
            hp.save(f)
            assert EditHparams.load(f) == hp


def test_unconverged_values_are_named_in_the_report(caplog):
    """Edits whose value loss stays far above the stop are applied, but the report says which."""
    import logging

    syn = Synthetic()
    cls = syn.context_class()

    class Unconverged(cls):
        def values(self, reqs, layer, **options):
            Z, H = super().values(reqs, layer)
            self.report.value_losses[-len(reqs):] = [0.01 if r.case_id != 1 else 3.5 for r in reqs]
            return Z, H

    model = make_tiny_llama()
    ed = _tiny_editor(model, syn)
    ed.context_class = Unconverged
    with caplog.at_level(logging.WARNING, logger="pmedit.editor"):
        report = ed.edit(_requests(3))
    assert report.batches[0].unconverged == [1] and report.unconverged == [1]
    assert "1 edit(s) did not converge" in report.summary() and "did not converge" in caplog.text


def test_the_adding_a_method_recipe_works(tmp_path, monkeypatch):
    """docs/DESIGN.md's recipe, run: one file (here exec'd from the doc) plus one registry entry
    make a method available to the Editor, hyperparameter files, presets and experiment configs."""
    import re
    from pathlib import Path

    import torch

    import pmedit.methods as registry
    from pmedit.experiments import ExperimentConfig

    doc = (Path(__file__).resolve().parent.parent / "docs" / "DESIGN.md").read_text()
    code = re.search(r"```python\n(# pmedit/methods/ridge_sweep.py.*?)```", doc, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "ridge_sweep.py", "exec"), ns)
    monkeypatch.setattr(registry, "_REGISTRY", {**registry.methods(), "ridge": ns["METHOD"]})
    hp = EditHparams.preset("smollm2", method="ridge", layers=[1])
    assert type(hp).__name__ == "RidgeHparams" and hp.ridge_per_edit == 1e-3 and hp.lam == 100.0
    assert EditHparams.from_dict(hp.to_dict()) == hp
    cfg = ExperimentConfig.from_dict(dict(experiment="lambda-sweep", data=str(tmp_path / "x.json"), layers=[1],
                                          methods=["ridge"], total_edits=2, batch_sizes=[2], lambdas=[0.1],
                                          preset=None))
    assert cfg.edit_hparams("ridge", **{get_method("ridge").sweep_field: 0.5}).ridge_per_edit == 0.5
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _tiny_editor(model, syn, method="ridge", ridge_per_edit=0.01)
    W0 = ed._weight(1).detach().clone()
    ed.edit(_requests(3))
    assert not torch.equal(ed._weight(1), W0)
    ed.restore()
    assert torch.equal(ed._weight(1), W0)
