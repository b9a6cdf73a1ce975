"""ENCORE (pmedit.methods.encore) against a plain fp64 formula, and most-probable early stopping
(pmedit.values ``mpes_steps``) against an independent argmax check on SmolLM2."""
from __future__ import annotations

import pytest
import torch

import pmedit.values as values_mod
from conftest import make_tiny_llama
from pmedit.editor import Editor
from pmedit.hparams import EditHparams
from pmedit.hooks import Trace
from pmedit.models import ModelSpec
from pmedit.requests import EditRequest
from pmedit.tokens import encode_rewrite
from pmedit.values import optimize_values
from test_editor import Synthetic, _requests, _spd, _weights

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


class OptionsSynthetic(Synthetic):
    """Synthetic keys/values that also record the options each values() call was given."""

    def __init__(self):
        super().__init__()
        self.options = []

    def context_class(self):
        base, syn = super().context_class(), self

        class Ctx(base):
            def values(self, reqs, layer, **options):
                syn.options.append(options)
                return super().values(reqs, layer)

        return Ctx


def _encore_editor(model, syn, *, layers=(1,), **hp):
    d = model.config.intermediate_size
    c0 = {layer: _spd(d, seed=layer) for layer in layers}
    hparams = EditHparams(layers=list(layers), method="encore", **hp)
    return Editor(model, tokenizer=object(), hparams=hparams, second_moments=c0, progress=False,
                  templates=["{}"], context_class=syn.context_class())


def plain_encore(W0, C0, batches, *, lam, mu, keep=True, spread=1.0):
    """W ← W + R Kᵀ (λC0 + μI + Σ_p K_pK_pᵀ + KKᵀ)⁻¹ per batch (encore_main, fp64 solve)."""
    d = C0.shape[0]
    W = W0.double().clone()
    prev = torch.zeros(d, d, dtype=torch.float64)
    for R, K in batches:
        C = lam * C0 + mu * torch.eye(d, dtype=torch.float64) + prev
        adj = torch.linalg.solve(C + K @ K.T, K)
        W = W + (R / spread) @ adj.T
        if keep:
            prev = prev + K @ K.T
    return W


@pytest.mark.parametrize("keep", [True, False])
def test_encore_sequence_matches_plain_formula(keep):
    syn = OptionsSynthetic()
    model = make_tiny_llama()
    ed = _encore_editor(model, syn, lam=3.0, mu=0.7, keep_prior_edits=keep, mpes_steps=3)
    batches = [_requests(3), _requests(4, 3), _requests(2, 7)]
    for reqs in batches:
        ed.edit(reqs)
    d, hidden = 96, model.config.hidden_size
    rk = []
    for reqs in batches:
        Z, H = syn.values(hidden, reqs)
        rk.append(((Z - H).T, syn.keys(d, reqs, 1)))
    want = plain_encore(ed._original[1], ed._c0[1], rk, lam=3.0, mu=0.7, keep=keep)
    got = ed._weight(1).detach().double()
    assert float((got - want).norm() / want.norm()) < 1e-6
    assert syn.options == [{"mpes_steps": 3}] * 3
    # without μ the same numbers as MEMIT with kept keys; μ > 0 shrinks the update (its point)
    if keep:
        ref = plain_encore(ed._original[1], ed._c0[1], rk, lam=3.0, mu=0.0)
        assert float((got - ed._original[1].double()).norm()) < float((ref - ed._original[1].double()).norm())


def test_mu_zero_is_memit_with_kept_keys():
    syn = OptionsSynthetic()
    model = make_tiny_llama()
    enc = _encore_editor(model, syn, lam=2.0, mu=0.0)
    enc.edit(_requests(3))
    enc.edit(_requests(3, 3))
    a = _weights(enc)
    enc.restore()
    memit = Editor(model, tokenizer=object(), hparams=EditHparams(layers=[1], method="memit", lam=2.0,
                                                                  keep_prior_edits=True),
                   second_moments=enc._c0, progress=False, templates=["{}"], context_class=syn.context_class())
    memit.edit(_requests(3))
    memit.edit(_requests(3, 3))
    assert torch.equal(_weights(memit)[1], a[1])
    memit.restore()


def test_multi_layer_and_save_load_continue(tmp_path):
    syn = OptionsSynthetic()
    model = make_tiny_llama()
    ed = _encore_editor(model, syn, layers=(1, 2), lam=1.5, mu=2.0)
    for reqs in (_requests(3), _requests(3, 3), _requests(2, 6)):
        ed.edit(reqs)
    straight = _weights(ed)
    # layer 2 (the last) gets the residual R/1 on keys of layer 2; with synthetic h fixed, the
    # first layer's share is R/2 of the same residual
    d, hidden = 96, model.config.hidden_size
    for i, layer in enumerate((1, 2)):
        rk = []
        for reqs in (_requests(3), _requests(3, 3), _requests(2, 6)):
            Z, H = syn.values(hidden, reqs)
            rk.append(((Z - H).T, syn.keys(d, reqs, layer)))
        want = plain_encore(ed._original[layer], ed._c0[layer], rk, lam=1.5, mu=2.0, spread=2 - i)
        assert float((straight[layer].double() - want).norm() / want.norm()) < 1e-6, layer
    ed.restore()
    ed.edit(_requests(3))
    ed.edit(_requests(3, 3))
    path = ed.save_deltas(tmp_path / "encore.safetensors")
    ed.restore()
    ed2 = Editor.load_deltas(model, path, tokenizer=object(), second_moments=ed._c0, progress=False)
    ed2.context_class, ed2._templates = syn.context_class(), ["{}"]
    ed2.edit(_requests(2, 6))
    for layer in (1, 2):
        assert torch.equal(_weights(ed2)[layer], straight[layer]), layer
    ed2.restore()


def test_bad_input_errors():
    with pytest.raises(ValueError, match="'mu': must be a finite number >= 0"):
        EditHparams(layers=[1], method="encore", mu=-1.0)
    with pytest.raises(ValueError, match="'mu'"):
        EditHparams(layers=[1], method="encore", mu=float("nan"))
    with pytest.raises(ValueError, match="'mpes_steps': must be >= 0"):
        EditHparams(layers=[1], method="encore", mpes_steps=-2)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lam_e'\]"):
        EditHparams.from_dict({"layers": [1], "method": "encore", "lam_e": 0.1})
    syn = OptionsSynthetic()
    ed = _encore_editor(make_tiny_llama(), syn)
    with pytest.raises(ValueError, match="no requests"):
        ed.edit([])
    with pytest.raises(ValueError, match="mpes_steps must be an int >= 0"):
        optimize_values(None, None, None, 0, [], [], mpes_steps=-1)


def test_presets():
    from pmedit.methods import get_method

    assert get_method("encore").sweep_field == "mu"
    hp = EditHparams.preset("llama3-8b", method="encore")
    assert (hp.layers, hp.lam, hp.mu, hp.mpes_steps, hp.lr, hp.weight_decay, hp.clamp_norm_factor,
            hp.keep_prior_edits) == ((4, 5, 6, 7, 8), 15000.0, 20.0, 2, 0.5, 0.5, 0.75, True)
    hp = EditHparams.preset("smollm2", method="encore")
    assert hp.layers == (4,) and hp.keep_prior_edits and hp.mpes_steps == 2


# ------------------------------------------------------------------ most-probable early stopping
LAYER = 3
TEMPLATES = ["I like {{braces}}. {}"]
MPES_REQS = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=0),
             EditRequest("{} plays the sport of", "LeBron James", "football", "basketball", case_id=1)]
KW = dict(lr=0.5, kl_factor=0.0625, weight_decay=1e-3, clamp_norm_factor=4.0, loss_stop=0.0)


def _all_argmax(model, tok, spec, req, delta) -> bool:
    """Is target_new the greedy continuation, every token, under every rewriting prompt, with
    δ added to layer LAYER's output at the subject's last token? One prompt per forward pass."""
    name = spec.layer_name(LAYER)
    for t in [*TEMPLATES, None]:
        enc = encode_rewrite(tok, req, t)

        def add(_, out, pos=enc.subject_last):
            out = out.clone()
            out[0, pos] += delta.to(out.dtype)
            return out

        with torch.no_grad(), Trace(model, name, edit_output=add):
            logits = model(input_ids=torch.tensor([enc.ids])).logits[0]
        for i, target in enumerate(enc.target_ids):
            if int(logits[enc.first_scored + i].argmax()) != target:
                return False
    return True


@pytest.mark.slow
def test_mpes_stops_at_the_mth_argmax_evaluation(smollm2, monkeypatch):
    """One run without stopping records δ after every Adam step; an independent argmax check of
    each gives the evaluations at which the target is most probable; mpes_steps = m must stop
    at the m-th of them with exactly that δ (one edit per call, so trajectories are identical)."""
    model, tok = smollm2
    spec = ModelSpec.from_model(model)
    T = 8
    trail = []
    real = values_mod._adam_rows

    def recording(delta, *args):
        real(delta, *args)
        trail.append(delta[0].detach().clone())

    hits_seen = 0
    for req in MPES_REQS:
        trail.clear()
        monkeypatch.setattr(values_mod, "_adam_rows", recording)
        full = optimize_values(model, tok, spec, LAYER, [req], TEMPLATES, steps=T, **KW)
        monkeypatch.setattr(values_mod, "_adam_rows", real)
        deltas = [torch.zeros_like(trail[0])] + trail  # δ at evaluation t = 0..T
        assert len(deltas) == T + 1 and int(full.steps[0]) == T
        hit = [_all_argmax(model, tok, spec, req, dl) for dl in deltas]
        at = [t for t, h in enumerate(hit) if h]
        hits_seen = max(hits_seen, len(at))
        for m in (1, 2, 3):
            res = optimize_values(model, tok, spec, LAYER, [req], TEMPLATES, steps=T, mpes_steps=m, **KW)
            want = at[m - 1] if len(at) >= m else T
            assert int(res.steps[0]) == want, (req.subject, m, hit)
            assert torch.equal(res.delta[0], deltas[want]), (req.subject, m)
        # m = 1 is the existing stop_on_argmax rule, bit for bit
        one = optimize_values(model, tok, spec, LAYER, [req], TEMPLATES, steps=T, mpes_steps=1, **KW)
        arg = optimize_values(model, tok, spec, LAYER, [req], TEMPLATES, steps=T, stop_on_argmax=True, **KW)
        assert torch.equal(one.z, arg.z) and torch.equal(one.steps, arg.steps)
    assert hits_seen >= 2, "the check needs an edit that is most probable at two evaluations or more"


# ------------------------------------------------------------------ SmolLM2 end to end
@pytest.mark.slow
def test_smollm2_counterfact_edits_stick(smollm2, shared_data):
    from pmedit.data import load_counterfact
    from pmedit.evaluation import evaluate_counterfact

    model, tok = smollm2
    records = load_counterfact(shared_data / "counterfact" / "counterfact_original_500.json", limit=4)
    hp = EditHparams.preset("smollm2", method="encore", mom2_tokens=20_000, n_templates=2)
    ed = Editor(model, tok, hparams=hp, progress=False)
    try:
        ed.edit(records, batch_size=2)  # a sequence of two batches, the first one's keys kept
        res = evaluate_counterfact(model, tok, records, progress=False)
        stuck = sum(r.success["rewrite"] > 0.5 for r in res.records)
        assert stuck >= 3, [r.to_dict() for r in res.records]
    finally:
        ed.restore()
