"""Value objectives and engines: the default objective is bit-identical to the frozen copy of
today's code (pmedit/bench/values_reference.py); ``objective="memit"`` equals a plain transcription
of the MEMIT/EMMET authors' ``compute_z`` loop; ``engine="cached"`` equals the full pass (fp32)
and stays close in bf16. A tiny random Llama that reads SmolLM2's token ids keeps most tests fast.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from pmedit.bench import values_reference
from pmedit.models import ModelSpec
from pmedit.requests import EditRequest
from pmedit.tokens import encode_kl_prompt, encode_rewrite
from pmedit.values import optimize_values

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

REQS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=0),
    EditRequest("{} was born in", "Alan Turing", "São Paulo", case_id=1),
    EditRequest("The capital of {} is", "France", "Paris", case_id=2),  # SmolLM2's answer already
]
TEMPLATES = ["I like {{braces}}. {}", "A somewhat longer sentence comes first here. {}"]
LAYER = 1


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def tiny(tok):
    model = make_tiny_llama(hidden=64, intermediate=96, layers=4, vocab=len(tok), seed=0)
    return model, ModelSpec.from_model(model)


def _same(a, b):
    for name in ("z", "h", "delta", "losses", "kl", "steps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------------------------- default


def test_default_is_bit_identical_to_todays_code(smollm2):
    """Same settings, same inputs: every output tensor equal bit for bit, on SmolLM2 with an edit
    that stops at step 0 (France → Paris, stop_on_argmax) so the regrouping path runs too."""
    model, tok = smollm2
    spec = ModelSpec.from_model(model)
    kw = dict(lr=0.5, steps=2, loss_stop=5e-2, stop_on_argmax=True, batch_size=2)
    ours = optimize_values(model, tok, spec, 3, REQS, TEMPLATES[:1], **kw)
    ref = values_reference.optimize_values(model, tok, spec, 3, REQS, TEMPLATES[:1], **kw)
    _same(ours, ref)
    assert ours.steps.tolist()[2] == 0 and ours.steps.tolist()[0] == 2


def test_default_bit_identical_on_tiny_llama(tiny, tok):
    model, spec = tiny
    kw = dict(lr=0.5, steps=3, kl_factor=0.5, weight_decay=0.1, loss_stop=0.0, batch_size=3)
    _same(optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, **kw),
          values_reference.optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, **kw))


# ------------------------------------------------------------------------------------ memit objective


def _authors_compute_z(model, tok, spec, layer, req, templates, *, lr, steps, kl_factor, weight_decay,
                       clamp_norm_factor, loss_stop):
    """memit/compute_z.py (unified-model-editing; the same in MEMIT's repository), written out for
    one edit: the bare prompt first (their context_templates[0] is ["{}"]), the KL prompt last, one
    padded batch, full logits, torch.optim.Adam, their loss, stop rule and loop. Tokenisation is
    pmedit's (not part of the objective). Returns δ, h, Adam updates, per-iteration (NLL, loss)."""
    rows = [encode_rewrite(tok, req, None)] + [encode_rewrite(tok, req, t) for t in templates]
    kl = encode_kl_prompt(tok, req.subject)
    seqs = [r.ids for r in rows] + [kl.ids]
    lookup_idxs = [r.subject_last for r in rows] + [kl.subject_last]
    n = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    targets = torch.full((len(rows), n), -100)
    for i, r in enumerate(rows):
        targets[i, r.first_scored: r.first_scored + len(r.target_ids)] = torch.tensor(r.target_ids)
    n_target = len(rows[0].target_ids)
    delta = torch.zeros(spec.hidden_size, requires_grad=True)
    state = {"target_init": None, "kl_init": None}

    def edit_output_fn(mod, args, out):
        hs = out[0] if isinstance(out, tuple) else out
        if state["target_init"] is None:
            state["target_init"] = hs[0, lookup_idxs[0]].detach().clone()
        hs = hs.clone()
        for i, idx in enumerate(lookup_idxs):
            hs[i, idx, :] += delta
        return (hs, *out[1:]) if isinstance(out, tuple) else hs

    opt = torch.optim.Adam([delta], lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handle = spec.layer(model, layer).register_forward_hook(edit_output_fn)
    history, updates = [], 0
    try:
        for it in range(steps):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=attn).logits
            kl_logits = logits[len(rows), lookup_idxs[-1]][None]
            kl_log_probs = torch.nn.functional.log_softmax(kl_logits, dim=1)
            if state["kl_init"] is None:
                state["kl_init"] = kl_log_probs.detach().clone()
            log_probs = torch.log_softmax(logits[: len(rows)], dim=2)
            loss = torch.gather(log_probs, 2, torch.where(targets != -100, targets, 0).unsqueeze(2)).squeeze(2)
            mask = (targets != -100).float()
            nll_loss = (-(loss * mask).sum(1) / n_target).mean()
            kl_loss = kl_factor * torch.nn.functional.kl_div(state["kl_init"], kl_log_probs, log_target=True,
                                                             reduction="batchmean")
            wd = weight_decay * (torch.norm(delta) / torch.norm(state["target_init"]) ** 2)
            loss = nll_loss + kl_loss + wd
            history.append((nll_loss.item(), loss.item()))
            if loss < loss_stop:
                break
            if it == steps - 1:
                break
            loss.backward()
            opt.step()
            updates += 1
            max_norm = clamp_norm_factor * state["target_init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
        return delta.detach(), state["target_init"], updates, history
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


MEMIT_KW = dict(lr=0.5, kl_factor=1.0, weight_decay=0.5, clamp_norm_factor=4.0)


@pytest.mark.parametrize("engine", ["full", "cached"])
def test_memit_objective_matches_authors_loop(tiny, tok, engine):
    model, spec = tiny
    steps = 5
    res = optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, steps=steps, loss_stop=0.0, batch_size=3,
                          objective="memit", engine=engine, **MEMIT_KW)
    for i, req in enumerate(REQS):
        d, h, updates, history = _authors_compute_z(model, tok, spec, LAYER, req, TEMPLATES, steps=steps,
                                                    loss_stop=0.0, **MEMIT_KW)
        assert updates == steps - 1 == int(res.steps[i])  # 24 updates for 25 steps
        torch.testing.assert_close(res.h[i], h, rtol=1e-5, atol=1e-6)
        assert (res.delta[i] - d).norm() <= 1e-4 * d.norm() + 1e-7, (i, (res.delta[i] - d).norm(), d.norm())
        assert abs(float(res.losses[i]) - history[-1][0]) <= 1e-4 * max(1.0, history[-1][0])
    # The objective differs from pmedit's in every term: different δ for the same settings.
    ours = optimize_values(model, tok, spec, LAYER, REQS[:1], TEMPLATES, steps=steps, loss_stop=0.0, **MEMIT_KW)
    assert (ours.delta[0] - res.delta[0]).norm() > 1e-3 * res.delta[0].norm()


def test_memit_stops_on_the_total_loss(tiny, tok):
    """A threshold that the NLL crosses at a different iteration than the total loss: the authors'
    loop stops on the total, and so must objective="memit"."""
    model, spec = tiny
    req, steps = REQS[0], 8
    _, _, _, history = _authors_compute_z(model, tok, spec, LAYER, req, TEMPLATES, steps=steps, loss_stop=0.0,
                                          **MEMIT_KW)

    def first_below(thr, k):
        return next((j for j, hh in enumerate(history) if hh[k] < thr), None)

    # just above a later iteration's NLL: the NLL rule stops there, the total-loss rule elsewhere
    thr = next(t for t in (hh[0] + 1e-4 for hh in history[1:]) if first_below(t, 0) != first_below(t, 1))
    _, _, updates, _ = _authors_compute_z(model, tok, spec, LAYER, req, TEMPLATES, steps=steps, loss_stop=thr,
                                          **MEMIT_KW)
    res = optimize_values(model, tok, spec, LAYER, [req], TEMPLATES, steps=steps, loss_stop=thr, objective="memit",
                          **MEMIT_KW)
    assert int(res.steps[0]) == updates
    nll_rule = first_below(thr, 0)
    assert updates != (nll_rule if nll_rule is not None else steps - 1)


# ----------------------------------------------------------------------------------- cached engine


@pytest.mark.parametrize("objective", ["pmedit", "memit"])
def test_cached_engine_equals_full_pass(tiny, tok, objective):
    model, spec = tiny
    impl = model.config._attn_implementation
    kw = dict(steps=4, loss_stop=0.0, kl_factor=0.5, weight_decay=0.1, objective=objective, batch_size=2)
    full = optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, **kw)
    cached = optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, engine="cached", **kw)
    assert model.config._attn_implementation == impl  # switched to eager only while it ran
    torch.testing.assert_close(cached.h, full.h, rtol=1e-5, atol=1e-6)
    rel = (cached.delta - full.delta).norm(dim=1) / full.delta.norm(dim=1)
    assert rel.max() <= 1e-4, rel
    assert cached.steps.tolist() == full.steps.tolist()
    torch.testing.assert_close(cached.losses, full.losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached.kl, full.kl, rtol=1e-3, atol=1e-6)


def test_cached_engine_on_smollm2_with_early_stops(smollm2):
    """The real model, stopped edits leaving the batch (France at step 0): as the full pass."""
    model, tok = smollm2
    spec = ModelSpec.from_model(model)
    kw = dict(steps=2, stop_on_argmax=True, batch_size=3)
    full = optimize_values(model, tok, spec, 3, REQS, TEMPLATES[:1], **kw)
    cached = optimize_values(model, tok, spec, 3, REQS, TEMPLATES[:1], engine="cached", **kw)
    assert cached.steps.tolist() == full.steps.tolist() and full.steps.tolist()[2] == 0
    scale = full.delta.norm(dim=1).clamp_min(1.0)
    assert ((cached.delta - full.delta).norm(dim=1) / scale).max() <= 1e-4
    torch.testing.assert_close(cached.h, full.h, rtol=1e-5, atol=1e-4)


def test_cached_bf16_stays_close(tiny, tok):
    model, spec = tiny
    kw = dict(steps=4, loss_stop=0.0, batch_size=3, engine="cached")
    fp32 = optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, **kw)
    bf16 = optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, dtype="bfloat16", **kw)
    assert bf16.delta.dtype == torch.float32 and torch.isfinite(bf16.delta).all()
    torch.testing.assert_close(bf16.h, fp32.h)  # the once-per-row passes are fp32
    rel = (bf16.delta - fp32.delta).norm(dim=1) / fp32.delta.norm(dim=1)
    assert rel.max() <= 0.1, rel
    assert not torch.equal(bf16.delta, fp32.delta)  # bf16 matmuls did run


def test_auto_dtype_is_bf16_only_with_native_bf16(tiny, tok, monkeypatch):
    """"auto" runs bf16 exactly where the CPU has AVX-512 BF16 or AMX (read here independently of
    the code under test), and gives the values of the dtype it resolves to, bit for bit."""
    from pathlib import Path

    from pmedit import values

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert values.native_bf16("cpu") == native
    assert values.resolve_value_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert values.resolve_value_dtype("float32", "cpu") == "float32"
    model, spec = tiny
    kw = dict(steps=2, loss_stop=0.0, batch_size=3, engine="cached")
    for has, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(values, "native_bf16", lambda device, has=has: has)
        auto = optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, dtype="auto", **kw)
        ref = optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, dtype=want, **kw)
        assert torch.equal(auto.delta, ref.delta), want


# ------------------------------------------------------------------------------------------ settings


def test_bad_settings_are_named(tiny, tok):
    model, spec = tiny
    for kw, word in [({"objective": "rome"}, "objective"), ({"engine": "fast"}, "engine"),
                     ({"dtype": "float16"}, "dtype")]:
        with pytest.raises(ValueError, match=word):
            optimize_values(model, tok, spec, LAYER, REQS[:1], TEMPLATES, **kw)


def test_hparams_fields(monkeypatch):
    from pmedit import hparams, value_objectives, values
    from pmedit.hparams import EditHparams
    from pmedit.methods import base

    assert hparams.VALUE_OBJECTIVES == value_objectives.OBJECTIVES
    assert hparams.VALUE_ENGINES == values.ENGINES and hparams.VALUE_DTYPES == (*values.DTYPES, "auto")
    import inspect

    defaults = inspect.signature(values.optimize_values).parameters
    assert base._VALUE_DEFAULTS == {k: defaults[k].default for k in base._VALUE_DEFAULTS}
    hp = EditHparams.preset("smollm2")
    assert (hp.value_objective, hp.value_engine, hp.value_dtype) == ("pmedit", "full", "float32")
    for field in ("value_objective", "value_engine", "value_dtype"):
        with pytest.raises(ValueError, match=field):
            hp.replace(**{field: "nonsense"})
    hp2 = hp.replace(value_objective="memit", value_engine="cached", value_dtype="bfloat16")
    assert EditHparams.from_dict(hp2.to_dict()) == hp2
