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
from pmedit.methods import EditContext
from pmedit.hparams import EditHparams
from pmedit.requests import EditRequest



pytestmark = pytest.mark.usefixtures("one_intraop_thread")


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
    """Seeded keys/values per (request, layer) through a fake EditContext (the Editor's public
    ``context_class``), plus counters and hooks to sabotage solves and writes."""

    def __init__(self, nan_case=None):
        self.nan_case = nan_case
        self.calls = {"values": [], "keys": []}
        self.on_solve = None  # (R, K, result) -> result
        self.on_write = None  # (ctx, layer, delta) -> None, before the real write

    def context_class(self):
        syn = self

        class SyntheticContext(EditContext):
            def values(self, reqs, layer):
                syn.calls["values"].append(len(reqs))
                Z, H = syn.values(self.spec.hidden_size, reqs)
                self.report.value_losses.extend([0.0] * len(reqs))
                self.report.value_steps.extend([1] * len(reqs))
                if not bool(torch.isfinite(Z).all()):
                    row = int((~torch.isfinite(Z)).any(dim=1).nonzero()[0])
                    raise EditError(f"{self.where}: non-finite target (case_id={reqs[row].case_id!r})")
                return Z, H

            def keys(self, reqs, layer):
                syn.calls["keys"].append(len(reqs))
                return syn.keys(self.d, reqs, layer)

            def outputs_at_subject(self, reqs, layer):
                return syn.values(self.spec.hidden_size, reqs)[1]

            def solve(self, R, K, layer, *, ridge):
                res = super().solve(R, K, layer, ridge=ridge)
                return syn.on_solve(R, K, res) if syn.on_solve else res

            def write(self, layer, delta):
                if syn.on_write:
                    syn.on_write(self, layer, delta)
                super().write(layer, delta)

        return SyntheticContext

    def values(self, hidden, reqs):
        H = torch.stack([torch.randn(hidden, generator=_seeded(r.case_id, "h"), dtype=torch.float64) for r in reqs])
        Z = H + torch.stack([torch.randn(hidden, generator=_seeded(r.case_id, "z"), dtype=torch.float64)
                             for r in reqs])
        for j, r in enumerate(reqs):
            if r.case_id == self.nan_case:
                Z[j, 3] = float("nan")
        return Z, H

    def keys(self, d, reqs, layer):
        return torch.stack([torch.rand(d, generator=_seeded(r.case_id, "k", layer), dtype=torch.float64)
                            for r in reqs]).T


def _tiny_editor(model, syn, method="emmet", layers=(1,), **hp):
    d = model.config.intermediate_size
    c0 = {layer: _spd(d, seed=layer) for layer in layers}
    hparams = EditHparams(layers=list(layers), method=method, **hp)
    return Editor(model, tokenizer=object(), hparams=hparams, second_moments=c0, progress=False,
                  templates=["{}"], context_class=syn.context_class())


def _weights(ed):
    return {layer: ed._weight(layer).detach().clone() for layer in ed.layers}


def _assert_same(a, b):
    for layer in a:
        assert torch.equal(a[layer], b[layer]), f"layer {layer} differs"


# ------------------------------------------------------------------ engine logic, synthetic


def test_emmet_writes_the_closed_form(monkeypatch):
    """(W+Δ)K = WK + R for EMMET with λₑ = 0: the solve is wired to the right weight and sign."""
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _tiny_editor(model, syn, lam_e=0.0)
    W0 = ed._weight(1).detach().double().clone()
    reqs = _requests(5)
    ed.edit(reqs)
    rep = ed.reports[-1].batches[0]
    K = syn.keys(model.config.intermediate_size, reqs, 1)
    Z, H = syn.values(model.config.hidden_size, reqs)
    W1 = ed._weight(1).detach().double()
    R = (Z - H).T
    err = ((W1 - W0) @ K - R).norm() / R.norm()
    # Δ is exact to ~1e-12 in fp64; writing it into fp32 weights rounds each entry (relative
    # 6e-8 of |W|), which over K's 96 terms leaves ~1e-7 of |WK| ≈ |R| here.
    assert err < 1e-6, err
    assert syn.calls["values"] and rep.update_norms[1] > 0 and rep.cond_estimates[1] >= 1


def test_batches_run_in_order_and_count(monkeypatch):
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _tiny_editor(model, syn)
    report = ed.edit(_requests(5), batch_size=2)
    assert [b.n_edits for b in report.batches] == [2, 2, 1]
    assert [b.case_ids for b in report.batches] == [[0, 1], [2, 3], [4]]
    assert ed.n_edits == 5 and len(report.value_losses) == 5
    json.dumps(report.to_dict())  # the report is plain data


def test_sequential_batches_differ_from_one_batch(monkeypatch):
    """B=2 over 4 edits is not B=4: later batches see (and preserve less of) earlier ones."""
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _tiny_editor(model, syn)
    ed.edit(_requests(4))
    one = _weights(ed)
    ed.restore()
    ed.edit(_requests(4), batch_size=2)
    two = _weights(ed)
    assert not torch.equal(one[1], two[1])


def test_restore_is_bit_exact(monkeypatch):
    syn = Synthetic()
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed = _tiny_editor(model, syn, method="memit", layers=(1, 2))
    ed.edit(_requests(6), batch_size=4)
    assert not torch.equal(ed._weight(1), before["model.layers.1.mlp.down_proj.weight"])
    ed.restore()
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert ed.n_edits == 0 and ed.reports == []


def test_nan_value_leaves_weights_unchanged(monkeypatch):
    syn = Synthetic(nan_case=3)
    model = make_tiny_llama()
    ed = _tiny_editor(model, syn)
    with pytest.raises(EditError, match="case_id=3") as e:
        ed.edit(_requests(4), batch_size=2)  # batch 0 fine, batch 1 holds the NaN
    assert len(e.value.report.batches) == 1
    after_first = _weights(ed)
    ed.restore()
    ed.edit(_requests(2))
    _assert_same(_weights(ed), after_first)  # the failed batch left exactly batch 0's weights
    assert ed.n_edits == 2


def test_nan_delta_leaves_weights_unchanged():
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _tiny_editor(model, syn, method="memit", layers=(1, 2))
    before = _weights(ed)
    calls = []

    def poisoned(R, K, delta):
        calls.append(1)
        if len(calls) == 2:  # layer 2, after layer 1 was already written
            delta[0, 0] = float("inf")
        return delta

    syn.on_solve = poisoned
    with pytest.raises(EditError, match="layer 2.*non-finite"):
        ed.edit(_requests(3))
    _assert_same(_weights(ed), before)
    assert ed.n_edits == 0


def test_keyboard_interrupt_mid_apply_leaves_weights_unchanged(monkeypatch):
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _tiny_editor(model, syn, method="rome", layers=(2,))
    ed.edit(_requests(2))
    before = _weights(ed)
    writes = []

    def interrupted(ctx, layer, delta):
        writes.append(layer)
        if len(writes) == 2:  # the second ROME edit of the batch, the first already written
            ctx.weight(layer).data[0].fill_(123.0)  # half-written row, then the interrupt
            raise KeyboardInterrupt

    syn.on_write = interrupted
    with pytest.raises(KeyboardInterrupt):
        ed.edit(_requests(3, start=10))
    syn.on_write = None
    _assert_same(_weights(ed), before)
    assert ed.n_edits == 2


def test_failed_solve_is_named_and_atomic():
    """λₑ = 0 with more edits than key dimensions is refused before any value optimisation; a
    solve that fails later (a non-finite key) names its batch and layer and changes nothing."""
    syn = Synthetic()
    model = make_tiny_llama(intermediate=24)
    ed = _tiny_editor(model, syn, lam_e=0.0)
    before = _weights(ed)
    with pytest.raises(ValueError, match=r"lam_e=0 needs at most d=24 edits.*set lam_e > 0"):
        ed.edit(_requests(30))
    assert syn.calls["values"] == []  # refused before the expensive part
    _assert_same(_weights(ed), before)
    ed.hparams = ed.hparams.replace(lam_e=0.1)
    real_keys = syn.keys
    syn.keys = lambda d, reqs, layer: real_keys(d, reqs, layer).index_fill_(0, torch.tensor([2]), float("nan"))
    with pytest.raises(ValueError, match=r"batch 0, layer 1: K has 30 non-finite"):
        ed.edit(_requests(30))
    _assert_same(_weights(ed), before)
    syn.keys = real_keys
    ed.edit(_requests(30))
    assert ed.n_edits == 30


def test_keep_prior_edits_grows_the_preservation_term(monkeypatch):
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _tiny_editor(model, syn, keep_prior_edits=True, lam=2.0)
    reqs = _requests(3)
    ed.edit(reqs)
    K = syn.keys(model.config.intermediate_size, reqs, 1)
    C = 2.0 * _spd(model.config.intermediate_size, seed=1)
    torch.testing.assert_close(ed.preservation(1).matrix(), C + K @ K.T, rtol=1e-12, atol=1e-12)
    ed.restore()
    torch.testing.assert_close(ed.preservation(1).matrix(), C, rtol=1e-12, atol=1e-12)


def test_memit_spreads_the_residual(monkeypatch):
    """With two layers, layer i gets R/(L−i): the first half of the residual, then the rest."""
    syn = Synthetic()
    seen = []
    syn.on_solve = lambda R, K, delta: seen.append(R.clone()) or delta
    model = make_tiny_llama()
    ed = _tiny_editor(model, syn, method="memit", layers=(1, 2))
    ed.edit(_requests(3))
    # synthetic h does not move, so layer 1 gets (z−h)/2 and layer 2 all of (z−h)
    torch.testing.assert_close(seen[1], 2 * seen[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_deltas_bit_exact(monkeypatch, tmp_path, dtype):
    syn = Synthetic()
    model = make_tiny_llama(seed=1).to(dtype)
    ed = _tiny_editor(model, syn, method="memit", layers=(0, 2))
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
    syn = Synthetic()
    ed = _tiny_editor(make_tiny_llama(seed=1), syn)
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


# ------------------------------------------------------------------------ SmolLM2, real edits

# Value optimisation is where the time goes (a forward and backward pass through SmolLM2 per
# step). Bare prompts only, lr 1.0 and ENCORE's stop (every target token greedy) end it after
# 2-4 steps per edit, and a C0 from a few thousand tokens is collected in seconds; the edits
# still land, which is what these tests check.
FAST = dict(steps=10, lr=1.0, stop_on_argmax=True, n_templates=0, mom2_tokens=4000, value_batch_size=8)


@pytest.fixture(scope="session")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pmedit-stats")


@pytest.fixture
def smol(smollm2):
    """(model, tok) plus a guard: the edited layers must be bit-exact again after the test."""
    model, tok = smollm2
    from pmedit.models import ModelSpec

    spec = ModelSpec.from_model(model)
    snap = {i: spec.down_proj(model, i).weight.detach().clone() for i in range(spec.n_layers)}
    yield model, tok
    for i, w in snap.items():
        assert torch.equal(spec.down_proj(model, i).weight, w), f"test left layer {i} edited"


def _smol_editor(model, tok, stats_dir, method="emmet", layers=(4,), context_class=EditContext, **changes):
    hp = EditHparams.preset("smollm2", method=method, layers=list(layers), **{**FAST, **changes})
    return Editor(model, tok, hparams=hp, cache_dir=stats_dir, progress=False, context_class=context_class)


def _completions(model, tok, reqs, n=4):
    from pmedit.commands.edit import greedy_completions

    return greedy_completions(model, tok, [r.filled_prompt for r in reqs], n)


def _hits(model, tok, reqs):
    outs = _completions(model, tok, reqs)
    return [o.strip().startswith(r.target_new.strip()) for r, o in zip(reqs, outs)], outs


def test_examples_are_known_to_smollm2(smol):
    """The example set is only a demo if the model knows the true facts before editing."""
    from pmedit.examples import example_requests

    model, tok = smol
    reqs = example_requests()
    outs = _completions(model, tok, reqs)
    assert all(o.strip().startswith(r.target_true) for r, o in zip(reqs, outs)), outs


@pytest.mark.parametrize("method, layers", [("rome", (4,)), ("memit", (3, 4)), ("emmet", (4,))])
def test_four_edits_reach_target(smol, stats_dir, method, layers):
    from pmedit.examples import example_requests

    model, tok = smol
    reqs = example_requests(4)
    ed = _smol_editor(model, tok, stats_dir, method=method, layers=layers)
    try:
        report = ed.edit(reqs)
        hits, outs = _hits(model, tok, reqs)
        assert all(hits), (outs, report.value_losses)
        assert len(report.batches) == 1 and report.batches[0].n_edits == 4
    finally:
        ed.restore()


def test_emmet_lambda_e_zero_meets_constraints(smol, stats_dir, monkeypatch):
    """(W₀+Δ)K = V = W₀K + R to 1e-6 relative with λₑ = 0 (EMMET's equality constraints)."""
    from pmedit.examples import example_requests

    model, tok = smol
    seen = []

    class Spy(EditContext):
        def solve(self, R, K, layer, *, ridge):
            seen.append((R.clone(), K.clone()))
            return super().solve(R, K, layer, ridge=ridge)

    ed = _smol_editor(model, tok, stats_dir, lam_e=0.0, steps=2, context_class=Spy)
    W0 = ed._weight(4).detach().double().clone()
    try:
        ed.edit(example_requests(4))
        (R, K), = seen
        V = W0 @ K + R
        W1 = ed._weight(4).detach().double()
        # Δ solves the constraints to ~1e-12 in fp64; the fp32 weight then rounds each entry by
        # ≤ 6e-8 relative, which after the sum over d = 1536 key entries leaves ~1e-7 of |V|.
        err = float((W1 @ K - V).norm() / V.norm())
        assert err < 1e-6, err
    finally:
        ed.restore()


def test_sequential_batched_two_by_two(smol, stats_dir):
    from pmedit.examples import example_requests

    model, tok = smol
    reqs = example_requests(4)
    ed = _smol_editor(model, tok, stats_dir)
    try:
        report = ed.edit(reqs, batch_size=2)
        assert [b.case_ids for b in report.batches] == [[r.case_id for r in reqs[:2]], [r.case_id for r in reqs[2:]]]
        hits, outs = _hits(model, tok, reqs)
        assert all(hits), outs  # the second batch did not undo the first
    finally:
        ed.restore()


def test_nan_and_interrupt_on_smollm2(smol, stats_dir, monkeypatch):
    import pmedit.values as values_mod
    from pmedit.examples import example_requests

    model, tok = smol
    ed = _smol_editor(model, tok, stats_dir, method="memit", layers=(3, 4), steps=1)
    before = _weights(ed)
    real = values_mod.optimize_values

    def nan_values(*a, **k):
        res = real(*a, **k)
        res.z[1, 0] = float("nan")
        return res

    monkeypatch.setattr(values_mod, "optimize_values", nan_values)
    with pytest.raises(EditError, match="non-finite target"):
        ed.edit(example_requests(2))
    _assert_same(_weights(ed), before)
    monkeypatch.setattr(values_mod, "optimize_values", real)

    class Interrupted(EditContext):
        def write(self, layer, delta):
            if layer == 4:  # layer 3 is already written when layer 4's write is interrupted
                raise KeyboardInterrupt
            super().write(layer, delta)

    ed.context_class = Interrupted
    with pytest.raises(KeyboardInterrupt):
        ed.edit(example_requests(2))
    _assert_same(_weights(ed), before)
    assert ed.n_edits == 0


def test_save_load_reproduces_logits(smol, stats_dir, tmp_path):
    from pmedit.examples import example_requests

    model, tok = smol
    reqs = example_requests(3)
    enc = tok([r.filled_prompt for r in reqs][:1], return_tensors="pt")
    ed = _smol_editor(model, tok, stats_dir, steps=3)
    try:
        ed.edit(reqs)
        with torch.no_grad():
            edited = model(**enc).logits.clone()
        path = ed.save_deltas(tmp_path / "edits.safetensors")
    finally:
        ed.restore()
    loaded = Editor.load_deltas(model, path, tokenizer=tok, progress=False)
    try:
        with torch.no_grad():
            again = model(**enc).logits
        assert torch.equal(again, edited)  # bit-exact weights give bit-exact logits
    finally:
        loaded.restore()


def _char_tokenizer():
    """A fast tokenizer with one token per printable character (vocab 99), offsets included.

    With it the tiny Llama's vocabulary stays tiny, so a 4096-edit batch costs what the engine
    costs, not what a 49k-word lm_head costs on a shared CPU.
    """
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *chars])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                  bos_token="[BOS]", eos_token="[EOS]")
    tok.padding_side = "right"
    return tok


def test_4096_edits_one_batch_bounded_memory(tmp_path, monkeypatch):
    """One 4096-edit EMMET batch (E > d = 96, so λₑ > 0) on a tiny random Llama.

    Memory is bounded by chunking: value optimisation and key computation never see more than
    their chunk of edits at once (checked), and the process's peak RSS grows by little.
    """
    import pmedit.keys as keys_mod
    import pmedit.values as values_mod

    tok = _char_tokenizer()
    model = make_tiny_llama(vocab=128, hidden=64, intermediate=96, layers=4)
    sizes = {"values": [], "keys": []}
    real_values, real_keys = values_mod.optimize_values, keys_mod.compute_keys

    def counting_values(model_, tok_, spec, layer, requests, *a, **k):
        sizes["values"].append(len(requests))
        return real_values(model_, tok_, spec, layer, requests, *a, **k)

    def counting_keys(model_, tok_, spec, layer, requests, *a, **k):
        sizes["keys"].append(len(requests))
        return real_keys(model_, tok_, spec, layer, requests, *a, **k)

    monkeypatch.setattr(values_mod, "optimize_values", counting_values)
    monkeypatch.setattr(keys_mod, "compute_keys", counting_keys)
    hp = EditHparams(layers=[1], method="emmet", steps=1, n_templates=1, template_length=3, lam_e=0.1,
                     mom2_tokens=2000, value_batch_size=128, key_batch_size=128)
    ed = Editor(model, tok, hparams=hp, cache_dir=tmp_path, progress=False)
    reqs = [EditRequest(prompt="{} lives in", subject=f"P{i}", target_new=" Q", case_id=i) for i in range(4096)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    report = ed.edit(reqs, batch_size=4096)
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert ed.n_edits == 4096 and len(report.batches) == 1
    assert max(sizes["values"]) <= 128 and sum(sizes["values"]) == 4096
    assert max(sizes["keys"]) <= 256 and sum(sizes["keys"]) == 4096
    # Whole-batch tensors are K [96, 4096] and z, h [4096, 64] in fp64 (3 + 2 MiB); the d×d
    # solve is 96×96. 300 MiB leaves room for allocator slack, not for an unchunked pass.
    assert grew_mib < 300, grew_mib
    assert report.batches[0].update_norms[1] > 0
    assert torch.isfinite(ed._weight(1)).all()


# ------------------------------------------------------------------------------- the CLI


def test_cli_reads_json_and_jsonl(tmp_path):
    from pmedit.commands.edit import read_requests

    rows = [{"prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Rome"}},
            {"case_id": 7, "requested_rewrite": {"prompt": "{} plays", "subject": "Ann", "target_new": {"str": "golf"},
                                                 "target_true": {"str": "chess"}}}]
    jl = tmp_path / "r.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = tmp_path / "r.json"
    js.write_text(json.dumps(rows))
    assert read_requests(jl) == read_requests(js)
    assert [r.case_id for r in read_requests(js)] == [None, 7]
    jl.write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="r.jsonl, line 2"):
        read_requests(jl)
    js.write_text(json.dumps([rows[0], {"prompt": "{} is", "subject": "X", "target_new": ""}]))
    with pytest.raises(ValueError, match="r.json: request 1 .*target_new"):
        read_requests(js)


def test_cli_hparams_resolution(tmp_path):
    import argparse

    from pmedit.commands.edit import _hparams, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert _hparams(p.parse_args([])) == EditHparams.preset("smollm2")
    hp = _hparams(p.parse_args(["--method", "memit", "--layers", "3,4", "--steps", "5"]))
    assert (hp.method, hp.layers, hp.steps) == ("memit", (3, 4), 5)
    f = tmp_path / "hp.yaml"
    EditHparams(layers=[2], lam=3.0).save(f)
    assert _hparams(p.parse_args(["--hparams", str(f)])).lam == 3.0
    with pytest.raises(ValueError, match="not both"):
        _hparams(p.parse_args(["--hparams", str(f), "--preset", "smollm2"]))
    with pytest.raises(ValueError, match="--layers"):
        _hparams(p.parse_args(["--model", "some/model"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--layers", "a,b"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_end_to_end(tmp_path, dtype):
    """A 16-bit model: keys/values in its dtype, the solve in fp64, the write rounded once."""
    tok = _char_tokenizer()
    model = make_tiny_llama(vocab=128, hidden=64, intermediate=96, layers=4).to(dtype)
    hp = EditHparams(layers=[1, 2], method="memit", steps=2, n_templates=1, template_length=3,
                     mom2_tokens=1000, lam=10.0)
    ed = Editor(model, tok, hparams=hp, cache_dir=tmp_path, progress=False)
    before = _weights(ed)
    reqs = [EditRequest(prompt="{} lives in", subject=f"P{i}", target_new=" Q", case_id=i) for i in range(8)]
    report = ed.edit(reqs, batch_size=4)
    for layer in (1, 2):
        W = ed._weight(layer)
        assert W.dtype == dtype and bool(torch.isfinite(W).all())
        assert not torch.equal(W, before[layer])
        assert all(b.update_norms[layer] > 0 for b in report.batches)
    ed.restore()
    _assert_same(_weights(ed), before)
