"""Independent batches solved together (pmedit.groups) and the key/value store
(pmedit.value_store): equal to editing each batch alone, reused only where valid, verified."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from pmedit.editor import Editor
from pmedit.groups import independent_updates
from pmedit.hparams import EditHparams
from pmedit.requests import EditRequest
from pmedit.value_store import ValueStore
from test_editor import Synthetic, _char_tokenizer, _requests, _spd, _tiny_editor

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


@pytest.mark.parametrize("method,hp,B", [("emmet", {"lam_e": 0.1}, 4), ("emmet", {"lam_e": 0.0}, 4), ("memit", {}, 4),
                                         ("rome", {}, 1), ("rome", {}, 2)])
def test_groups_equal_editing_each_batch_alone(method, hp, B):
    """In fp64 weights the groups' factors U_gV_gᵀ equal the Δ that Editor.edit writes for that
    batch alone (batched B×B solves vs pm_delta; ROME's single edits as 1×1 systems without a
    ridge, its groups of several, one edit after another, through the edit-and-restore fallback)."""
    syn = Synthetic()
    model = make_tiny_llama(seed=5).double()
    ed = _tiny_editor(model, syn, method=method, **hp)
    reqs = _requests(4 * B + (1 if B > 1 else 0))  # a shorter last group too
    up = independent_updates(ed, reqs, B)
    assert len(up.factors) == len(range(0, len(reqs), B)) and ed.n_edits == 0
    assert up.group_of(len(reqs))[-1] == len(up.factors) - 1
    for g, s in enumerate(range(0, len(reqs), B)):
        ed.edit(reqs[s:s + B])
        want = ed.deltas()[1]
        ed.restore()
        U, V = up.factors[g]
        got = U.double() @ V.double().mT
        assert float((got - want).norm() / want.norm()) < 1e-10, g


def test_groups_refuse_what_cannot_work():
    syn = Synthetic()
    model = make_tiny_llama(intermediate=24)
    ed = _tiny_editor(model, syn, lam_e=0.0)
    with pytest.raises(ValueError, match="lam_e=0 needs at most d=24"):
        independent_updates(ed, _requests(60), 30)
    assert syn.calls["values"] == []
    with pytest.raises(ValueError, match="group_size"):
        independent_updates(ed, _requests(2), 0)
    ed2 = _tiny_editor(make_tiny_llama(), syn, method="memit", layers=(1, 2))
    with pytest.raises(ValueError, match="one edited layer"):
        independent_updates(ed2, _requests(2), 1)


# ------------------------------------------------------------------------------ the store


def _real_editor(model, tok, store, c0, **hp):
    hparams = EditHparams(layers=[1], method="emmet", steps=3, n_templates=1, template_length=3,
                          value_batch_size=2, **hp)
    return Editor(model, tok, hparams=hparams, second_moments=c0, progress=False, value_store=store,
                  templates=["{}", "A b. {}"])


def _reqs(n):
    return [EditRequest(prompt="{} lives in", subject=f"P{i}", target_new=" Q", case_id=i) for i in range(n)]


@pytest.fixture
def tiny():
    tok = _char_tokenizer()
    model = make_tiny_llama(vocab=128, hidden=32, intermediate=48, layers=3, seed=0)
    return model, tok, {1: _spd(48, seed=1)}


def test_store_reuse_is_bit_identical_and_scoped(tiny, tmp_path):
    model, tok, c0 = tiny
    reqs = _reqs(5)
    plain = _real_editor(model, tok, None, c0)
    plain.edit(reqs)
    want = plain.deltas()[1]
    plain.restore()

    store = ValueStore(tmp_path / "vs")
    ed = _real_editor(model, tok, store, c0)
    ed.edit(reqs)
    assert torch.equal(ed.deltas()[1], want)  # storing changes nothing
    ed.restore()
    assert (store.hits, store.misses) == (0, 10)  # 5 values + 5 keys computed
    ed.edit(reqs)  # every batch size, every λ: the same entries
    assert torch.equal(ed.deltas()[1], want) and (store.hits, store.misses) == (10, 10)
    ed.restore()
    reopened = ValueStore(tmp_path / "vs")
    assert len(reopened) == 10 and reopened.reuse_factor() == 1.0
    # later batches of a sequence run on edited weights: never served from the store
    ed.edit(reqs[:2], batch_size=1)
    assert store.hits == 11 + 1  # batch 0's key and value only
    ed.restore()
    # other settings or other weights: other entries
    other = _real_editor(model, tok, reopened, c0, lr=0.3)
    other.edit(reqs[:1])
    other.restore()
    assert reopened.hits == 1 and reopened.misses == 1  # the key is shared, the value is not
    model2 = make_tiny_llama(vocab=128, hidden=32, intermediate=48, layers=3, seed=1)
    third = _real_editor(model2, tok, reopened, c0)
    third.edit(reqs[:1])
    third.restore()
    assert reopened.hits == 1 and reopened.misses == 3


@pytest.mark.parametrize("native", [False, True])
def test_auto_dtype_values_are_stored_under_the_dtype_that_computed_them(tiny, tmp_path, monkeypatch, native):
    """value_dtype "auto" shares entries with the dtype it resolves to on this machine and never
    with the other one (bf16 and fp32 values differ)."""
    import pmedit.values as values_mod

    monkeypatch.setattr(values_mod, "native_bf16", lambda device: native)
    model, tok, c0 = tiny
    store = ValueStore(tmp_path / "vs")
    for dtype in ("auto", "bfloat16" if native else "float32", "float32" if native else "bfloat16"):
        ed = _real_editor(model, tok, store, c0, value_engine="cached", value_dtype=dtype)
        ed.edit(_reqs(2))
        ed.restore()
    assert (store.hits, store.misses) == (2 + 2 + 2, 4 + 2)  # keys always shared; values once more


def test_killed_value_computation_resumes_bit_identically(tiny, tmp_path, monkeypatch):
    import pmedit.values as values_mod

    model, tok, c0 = tiny
    reqs = _reqs(6)
    ref = ValueStore(tmp_path / "ref")
    first = _real_editor(model, tok, ref, c0)
    first.edit(reqs)
    first.restore()
    real = values_mod.optimize_values
    calls = []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # two chunks of two stored, then the kill
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(values_mod, "optimize_values", killed)
    with pytest.raises(KeyboardInterrupt):
        _real_editor(model, tok, ValueStore(tmp_path / "vs"), c0).edit(reqs)
    monkeypatch.setattr(values_mod, "optimize_values", real)
    store = ValueStore(tmp_path / "vs")
    assert len(store) == 4
    again = _real_editor(model, tok, store, c0)
    again.edit(reqs)
    again.restore()
    assert store.hits == 4 and len(store) == len(ref) == 12
    for key in ref._where:
        a, b = ref._where[key][1], store._where[key][1]
        assert all(torch.equal(a[f], b[f]) for f in a), key


def test_corrupt_shard_is_detected(tiny, tmp_path):
    model, tok, c0 = tiny
    ed = _real_editor(model, tok, ValueStore(tmp_path / "vs"), c0)
    ed.edit(_reqs(2))
    ed.restore()
    shard = sorted((tmp_path / "vs").glob("shard-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{shard.name}: value store shard checksum mismatch.*delete"):
        ValueStore(tmp_path / "vs")


def test_entries_from_other_code_are_never_used(tiny, tmp_path, monkeypatch):
    """The key includes a hash of the source that computes it: changed value code, new entries."""
    import pmedit.value_store as vs

    model, tok, c0 = tiny
    store = ValueStore(tmp_path / "vs")
    ed = _real_editor(model, tok, store, c0)
    ed.edit(_reqs(1))
    ed.restore()
    monkeypatch.setattr(vs, "_code_digests", {"keys": vs.code_version("keys"), "values": "other code"})
    ed.edit(_reqs(1))
    ed.restore()
    assert (store.hits, store.misses) == (1, 3)  # the key is reused, the value recomputed


@pytest.mark.parametrize("lam,lam_e", [(100.0, 0.1), (100.0, 10.0), (3.0, 0.5)])
def test_emmet_is_memit_at_the_product_of_its_weights(lam, lam_e):
    """On one layer EMMET (C = λ·C0, ridge λₑ) and MEMIT (C = λ'·C0, ridge 1) write the same Δ
    when λ' = λ·λₑ: both are R (KᵀC0⁻¹K + ρI)⁻¹KᵀC0⁻¹ with ρ = λλₑ resp. λ'. The λ sweep's
    EMMET rows therefore repeat its MEMIT rows shifted by the factor λ (docs/experiments.md)."""
    syn = Synthetic()
    reqs = _requests(6)
    deltas = {}
    for method, hp in (("emmet", {"lam": lam, "lam_e": lam_e}), ("memit", {"lam": lam * lam_e})):
        ed = _tiny_editor(make_tiny_llama(seed=5).double(), syn, method=method, **hp)
        ed.edit(reqs)
        deltas[method] = ed.deltas()[1]
    want = deltas["memit"]
    assert float((deltas["emmet"] - want).norm() / want.norm()) < 1e-10
