"""The Editor: batching, atomicity, restore, save/load of deltas, and real edits on SmolLM2.

Two kinds of tests. On a tiny random Llama with *synthetic* keys and values (the Editor's
key/value hooks replaced by seeded random vectors) the engine's own logic is checked exactly:
what is written, when, and what is undone. On SmolLM2 (the session fixture) the whole pipeline
runs with few value steps and a small C0 cached in a temp dir; every test that edits the shared
model restores it in ``finally`` and checks the restore bit for bit.
"""
from __future__ import annotations

import json
import resource
import zlib

import pytest
import torch

from conftest import make_tiny_llama
from pmedit.editor import EditError, Editor
from pmedit.hparams import EditHparams
from pmedit.requests import EditRequest

# --------------------------------------------------------------------------- synthetic set-up


def _seeded(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))


def _spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (4 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def _requests(n: int, start: int = 0) -> list[EditRequest]:
    return [EditRequest(prompt="{} lives in", subject=f"Person {i}", target_new=f" City {i}", case_id=i)
            for i in range(start, start + n)]


class Synthetic:
    """Seeded keys/values per (request, layer), plus the hooks to count and sabotage them."""

    def __init__(self, nan_case=None):
        self.nan_case = nan_case
        self.calls = {"values": [], "keys": []}

    def install(self, monkeypatch):
        syn = self

        def values(ed, reqs, layer, rep):
            syn.calls["values"].append(len(reqs))
            hidden = ed.spec.hidden_size
            H = torch.stack([torch.randn(hidden, generator=_seeded(r.case_id, "h"), dtype=torch.float64)
                             for r in reqs])
            Z = H + torch.stack([torch.randn(hidden, generator=_seeded(r.case_id, "z"), dtype=torch.float64)
                                 for r in reqs])
            for j, r in enumerate(reqs):
                if r.case_id == syn.nan_case:
                    Z[j, 3] = float("nan")
            rep.value_losses.extend([0.0] * len(reqs))
            rep.value_steps.extend([1] * len(reqs))
            return Z, H, rep.value_losses[-len(reqs):], rep.value_steps[-len(reqs):]

        def keys(ed, reqs, layer, rep):
            syn.calls["keys"].append(len(reqs))
            return torch.stack([torch.rand(ed._d, generator=_seeded(r.case_id, "k", layer), dtype=torch.float64)
                                for r in reqs]).T

        def outputs(ed, reqs, layer):
            # the "current output" of the last layer moves with the written weights: use the
            # weights' checksum so a stale H (not recomputed) would be caught by the MEMIT test
            return torch.stack([torch.randn(ed.spec.hidden_size, generator=_seeded(r.case_id, "h"),
                                            dtype=torch.float64) for r in reqs])

        monkeypatch.setattr(Editor, "_values", values)
        monkeypatch.setattr(Editor, "_keys", keys)
        monkeypatch.setattr(Editor, "_outputs_at_subject", outputs)
        monkeypatch.setattr(Editor, "_context_templates", lambda ed: ["{}"])
        return self


def _tiny_editor(model, method="emmet", layers=(1,), **hp):
    d = model.config.intermediate_size
    c0 = {layer: _spd(d, seed=layer) for layer in layers}
    hparams = EditHparams(layers=list(layers), method=method, **hp)
    return Editor(model, tokenizer=object(), hparams=hparams, second_moments=c0, progress=False)


def _weights(ed):
    return {layer: ed._weight(layer).detach().clone() for layer in ed.layers}


def _assert_same(a, b):
    for layer in a:
        assert torch.equal(a[layer], b[layer]), f"layer {layer} differs"


# ------------------------------------------------------------------ engine logic, synthetic


def test_emmet_writes_the_closed_form(monkeypatch):
    """(W+Δ)K = WK + R for EMMET with λₑ = 0: the solve is wired to the right weight and sign."""
    syn = Synthetic().install(monkeypatch)
    model = make_tiny_llama()
    ed = _tiny_editor(model, lam_e=0.0)
    W0 = ed._weight(1).detach().double().clone()
    reqs = _requests(5)
    ed.edit(reqs)
    rep = ed.reports[-1].batches[0]
    K = Editor._keys(ed, reqs, 1, rep)
    Z, H, *_ = Editor._values(ed, reqs, 1, rep)
    W1 = ed._weight(1).detach().double()
    R = (Z - H).T
    err = ((W1 - W0) @ K - R).norm() / R.norm()
    # Δ is exact to ~1e-12 in fp64; writing it into fp32 weights rounds each entry (relative
    # 6e-8 of |W|), which over K's 96 terms leaves ~1e-7 of |WK| ≈ |R| here.
    assert err < 1e-6, err
    assert syn.calls["values"] and rep.update_norms[1] > 0 and rep.cond_estimates[1] >= 1


def test_batches_run_in_order_and_count(monkeypatch):
    Synthetic().install(monkeypatch)
    model = make_tiny_llama()
    ed = _tiny_editor(model)
    report = ed.edit(_requests(5), batch_size=2)
    assert [b.n_edits for b in report.batches] == [2, 2, 1]
    assert [b.case_ids for b in report.batches] == [[0, 1], [2, 3], [4]]
    assert ed.n_edits == 5 and len(report.value_losses) == 5
    json.dumps(report.to_dict())  # the report is plain data


def test_sequential_batches_differ_from_one_batch(monkeypatch):
    """B=2 over 4 edits is not B=4: later batches see (and preserve less of) earlier ones."""
    Synthetic().install(monkeypatch)
    model = make_tiny_llama()
    ed = _tiny_editor(model)
    ed.edit(_requests(4))
    one = _weights(ed)
    ed.restore()
    ed.edit(_requests(4), batch_size=2)
    two = _weights(ed)
    assert not torch.equal(one[1], two[1])


def test_restore_is_bit_exact(monkeypatch):
    Synthetic().install(monkeypatch)
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed = _tiny_editor(model, method="memit", layers=(1, 2))
    ed.edit(_requests(6), batch_size=4)
    assert not torch.equal(ed._weight(1), before["model.layers.1.mlp.down_proj.weight"])
    ed.restore()
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert ed.n_edits == 0 and ed.reports == []


def test_nan_value_leaves_weights_unchanged(monkeypatch):
    Synthetic(nan_case=3).install(monkeypatch)
    model = make_tiny_llama()
    ed = _tiny_editor(model)
    with pytest.raises(EditError, match="case_id=3") as e:
        ed.edit(_requests(4), batch_size=2)  # batch 0 fine, batch 1 holds the NaN
    assert len(e.value.report.batches) == 1
    after_first = _weights(ed)
    ed.restore()
    ed.edit(_requests(2))
    _assert_same(_weights(ed), after_first)  # the failed batch left exactly batch 0's weights
    assert ed.n_edits == 2


def test_nan_delta_leaves_weights_unchanged(monkeypatch):
    import pmedit.editor as editor_mod

    Synthetic().install(monkeypatch)
    model = make_tiny_llama()
    ed = _tiny_editor(model, method="memit", layers=(1, 2))
    before = _weights(ed)
    real = editor_mod.pm_delta
    calls = []

    def poisoned(*a, **k):
        res = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:  # layer 2, after layer 1 was already written
            res.delta[0, 0] = float("inf")
        return res

    monkeypatch.setattr(editor_mod, "pm_delta", poisoned)
    with pytest.raises(EditError, match="layer 2.*non-finite"):
        ed.edit(_requests(3))
    _assert_same(_weights(ed), before)
    assert ed.n_edits == 0


def test_keyboard_interrupt_mid_apply_leaves_weights_unchanged(monkeypatch):
    Synthetic().install(monkeypatch)
    model = make_tiny_llama()
    ed = _tiny_editor(model, method="rome", layers=(2,))
    ed.edit(_requests(2))
    before = _weights(ed)
    real = Editor._write
    writes = []

    def interrupted(self, layer, new):
        writes.append(layer)
        if len(writes) == 2:  # the second ROME edit of the batch, the first already written
            self._weight(layer).data[0].fill_(123.0)  # half-written row, then the interrupt
            raise KeyboardInterrupt
        real(self, layer, new)

    monkeypatch.setattr(Editor, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ed.edit(_requests(3, start=10))
    monkeypatch.setattr(Editor, "_write", real)
    _assert_same(_weights(ed), before)
    assert ed.n_edits == 2


def test_failed_solve_is_named_and_atomic(monkeypatch):
    """EMMET with more edits than key dimensions needs λₑ > 0; pm_delta's error surfaces."""
    Synthetic().install(monkeypatch)
    model = make_tiny_llama(intermediate=24)
    ed = _tiny_editor(model, lam_e=0.0)
    before = _weights(ed)
    with pytest.raises(ValueError, match=r"batch 0, layer 1: .*lam_e > 0"):
        ed.edit(_requests(30))
    _assert_same(_weights(ed), before)
    ed.hparams = ed.hparams.replace(lam_e=0.1)
    ed.edit(_requests(30))
    assert ed.n_edits == 30


def test_keep_prior_edits_grows_the_preservation_term(monkeypatch):
    Synthetic().install(monkeypatch)
    model = make_tiny_llama()
    ed = _tiny_editor(model, keep_prior_edits=True, lam=2.0)
    reqs = _requests(3)
    ed.edit(reqs)
    K = Editor._keys(ed, reqs, 1, None)
    want = 2.0 * _spd(model.config.intermediate_size, seed=1) + K @ K.T
    got = ed._factors[1].matrix()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ed.restore()
    assert ed._factors[1] is ed._base_factors[1]


def test_memit_spreads_the_residual(monkeypatch):
    """With two layers, layer i gets R/(L−i): the first half of the residual, then the rest."""
    import pmedit.editor as editor_mod

    Synthetic().install(monkeypatch)
    seen = []
    real = editor_mod.pm_delta

    def spy(method, R, K, C, **k):
        seen.append(R.clone())
        return real(method, R, K, C, **k)

    monkeypatch.setattr(editor_mod, "pm_delta", spy)
    model = make_tiny_llama()
    ed = _tiny_editor(model, method="memit", layers=(1, 2))
    ed.edit(_requests(3))
    # synthetic h does not move, so layer 1 gets (z−h)/2 and layer 2 all of (z−h)
    torch.testing.assert_close(seen[1], 2 * seen[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_deltas_bit_exact(monkeypatch, tmp_path, dtype):
    Synthetic().install(monkeypatch)
    model = make_tiny_llama(seed=1).to(dtype)
    ed = _tiny_editor(model, method="memit", layers=(0, 2))
    ed.edit(_requests(4), batch_size=3)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    path = ed.save_deltas(tmp_path / "d.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]

    fresh = make_tiny_llama(seed=1).to(dtype)
    loaded = Editor.load_deltas(fresh, path, progress=False)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, edited[k]), k
    assert loaded.n_edits == 4 and loaded.layers == (0, 2) and loaded.method == "memit"
    loaded.restore()
    original = make_tiny_llama(seed=1).to(dtype)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, original.state_dict()[k]), k


def test_load_deltas_refuses_other_models(monkeypatch, tmp_path):
    Synthetic().install(monkeypatch)
    ed = _tiny_editor(make_tiny_llama(seed=1))
    ed.edit(_requests(2))
    path = ed.save_deltas(tmp_path / "d.safetensors")
    other = make_tiny_llama(seed=2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="fingerprint"):
        Editor.load_deltas(other, path)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])
    # the edited model itself is not a valid base either
    with pytest.raises(ValueError, match="fingerprint|SHA-256"):
        Editor.load_deltas(ed.model, path)
    with pytest.raises(FileNotFoundError):
        Editor.load_deltas(other, tmp_path / "missing.safetensors")


def test_editor_argument_errors():
    model = make_tiny_llama(layers=3)
    with pytest.raises(ValueError, match="layers"):
        Editor(model, object())
    with pytest.raises(ValueError, match="layer index 7 out of range"):
        Editor(model, object(), layers=[7])
    with pytest.raises(ValueError, match="second_moments\\[1\\]"):
        Editor(model, object(), layers=[1], second_moments={1: torch.eye(3)})
    ed = Editor(model, object(), method="memit", layers=[0, 1], hparams="smollm2")
    assert ed.method == "memit" and ed.layers == (0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        ed.edit(_requests(1), batch_size=0)
    with pytest.raises(ValueError, match="request 0 .*subject"):
        ed.edit([{"prompt": "{} is", "subject": "", "target_new": "x"}])
