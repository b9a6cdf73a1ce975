"""AlphaEdit (pmedit.methods.alphaedit, pmedit.projection) against the authors' d×d formula in
plain fp64 torch: random and real SmolLM2 C0, one batch and sequences; the projector cache; state
that must not leak across Editors, restore() or failed batches; deltas round trips; bad input."""
from __future__ import annotations


import pytest
import torch

from conftest import make_tiny_llama
from pmedit.editor import Editor, EditError
from pmedit.hparams import EditHparams
from pmedit.methods.alphaedit import Prior, alphaedit_delta, state_key
from pmedit.requests import EditRequest
from pmedit.projection import eigh_path, load_or_compute_eigh, null_space_basis
from test_editor import Synthetic, _requests, _weights
from test_experiments import toy  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


# ------------------------------------------------------------------ the authors' formula, fp64
def authors_projector(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's get_project: SVD of the covariance, P = U Uᵀ over singular values < threshold."""
    U, S, _ = torch.linalg.svd(C0.double(), full_matrices=False)
    idx = (S < threshold).nonzero(as_tuple=True)[0]
    return U[:, idx] @ U[:, idx].T


def authors_delta(R, K1, P, Kp_Kp_T, l2):
    """AlphaEdit_main: solve(P (K₁K₁ᵀ + cache_c) + L2·I, P K₁ Rᵀ), transposed to [d_out, d]."""
    d = K1.shape[0]
    X = torch.linalg.solve(P @ (K1 @ K1.T + Kp_Kp_T) + l2 * torch.eye(d, dtype=torch.float64), P @ K1 @ R.T)
    return X.T


def _spectrum_c0(d: int, seed: int = 0) -> torch.Tensor:
    """A C0 with MLP-like decaying spectrum 1 .. 1e-4 (so thresholds pick a proper subspace)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (Q * torch.logspace(0, -4, d, dtype=torch.float64)) @ Q.T


def _ours_sequence(C0, threshold, l2, batches):
    """Δ per batch from alphaedit_delta with the factor carried (reuse), as edit_batch does."""
    eig = load_or_compute_eigh(C0, layer=0, fingerprint="test", root=None)
    U = null_space_basis(eig, threshold)
    r = U.shape[1]
    prior = Prior.from_keys(U, None, l2)
    out = []
    for R, K in batches:
        delta, prior, res = alphaedit_delta(R, K, U, prior)
        assert res < 1e-12
        out.append(delta)
    return out, r


def _authors_sequence(C0, threshold, l2, batches):
    P = authors_projector(C0, threshold)
    cache_c = torch.zeros_like(C0)
    out = []
    for R, K in batches:
        out.append(authors_delta(R, K, P, cache_c, l2))
        cache_c = cache_c + K @ K.T
    return out


@pytest.mark.parametrize("d,E,n_batches,threshold", [(96, 5, 1, 1e-2), (96, 40, 4, 1e-2), (123, 7, 3, 1e-3),
                                                      (64, 50, 2, 0.5)])
def test_spd_route_equals_authors_formula_random(d, E, n_batches, threshold):
    C0 = _spectrum_c0(d)
    g = torch.Generator().manual_seed(d + E)
    batches = [(torch.randn(17, E, generator=g, dtype=torch.float64), torch.randn(d, E, generator=g, dtype=torch.float64))
               for _ in range(n_batches)]
    ours, r = _ours_sequence(C0, threshold, 10.0, batches)
    ref = _authors_sequence(C0, threshold, 10.0, batches)
    assert 0 < r < d
    for b, (x, y) in enumerate(zip(ours, ref)):
        err = float((x - y).norm() / y.norm())
        assert err < 1e-10, f"batch {b}: relative difference {err:.2e} (d={d}, r={r}, E={E})"
    # the update lies in the kept space: Δ (I − P) = 0, so Δ k = 0 for keys C0 holds
    P = authors_projector(C0, threshold)
    assert float((ours[-1] @ (torch.eye(d, dtype=torch.float64) - P)).norm() / ours[-1].norm()) < 1e-10


def test_spd_route_equals_authors_formula_on_smollm2_c0(smollm2, tmp_path, shared_data):
    """Real SmolLM2 statistics (layer 4, few tokens) and real keys, three sequential batches."""
    from pmedit.keys import compute_keys
    from pmedit.models import ModelSpec
    from pmedit.stats import load_or_collect

    model, tok = smollm2
    spec = ModelSpec.from_model(model)
    C0 = load_or_collect(model, tok, [4], max_tokens=4096, cache_dir=tmp_path, progress=False)[4].mean
    reqs = [EditRequest(prompt="{} is located in", subject=s, target_new=" Rome") for s in
            ("the Eiffel Tower", "Big Ben", "the Colosseum", "Mount Fuji", "the Kremlin", "Niagara Falls")]
    K = compute_keys(model, tok, spec, 4, reqs, ["{}", "Yesterday. {}"]).mT.double()  # [d, 6]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(spec.hidden_size, 2, generator=g, dtype=torch.float64), K[:, 2 * b:2 * b + 2])
               for b in range(3)]
    for threshold in (5e-3, 2e-2):
        ours, r = _ours_sequence(C0, threshold, 10.0, batches)
        ref = _authors_sequence(C0, threshold, 10.0, batches)
        assert 0 < r < C0.shape[0]
        for b, (x, y) in enumerate(zip(ours, ref)):
            err = float((x - y).norm() / y.norm())
            assert err < 1e-9, f"threshold {threshold}, batch {b}: relative difference {err:.2e} (r={r})"


# ------------------------------------------------------------------ through the Editor (synthetic)
def _alpha_editor(model, syn, tmp_path, *, layers=(1,), c0=None, **hp):
    d = model.config.intermediate_size
    c0 = c0 or {layer: _spectrum_c0(d, seed=layer) for layer in layers}
    hparams = EditHparams(layers=list(layers), method="alphaedit", **{"nullspace_threshold": 1e-2, **hp})
    return Editor(model, tokenizer=object(), hparams=hparams, second_moments=c0, progress=False,
                  templates=["{}"], context_class=syn.context_class(), cache_dir=tmp_path)


def _expected_weights(ed, syn, reqs_batches, *, layer=1, threshold=1e-2, l2=10.0, keep=True):
    """The authors' sequence on the synthetic keys and values, from the original weights."""
    d, hidden = ed.model.config.intermediate_size, ed.model.config.hidden_size
    P = authors_projector(ed._c0[layer], threshold)
    W = ed._original[layer].double().clone()
    cache_c = torch.zeros(d, d, dtype=torch.float64)
    for reqs in reqs_batches:
        K = syn.keys(d, reqs, layer)
        Z, H = syn.values(hidden, reqs)
        W = W + authors_delta((Z - H).T, K, P, cache_c, l2)
        if keep:
            cache_c = cache_c + K @ K.T
    return W


@pytest.mark.parametrize("keep", [True, False])
def test_editor_sequence_matches_authors(tmp_path, keep):
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _alpha_editor(model, syn, tmp_path, keep_prior_edits=keep)
    batches = [_requests(3, 0), _requests(4, 3), _requests(2, 7)]
    for reqs in batches:
        ed.edit(reqs)
    want = _expected_weights(ed, syn, batches, keep=keep)
    got = ed._weight(1).detach().double()
    # W is fp32: each write rounds to 6e-8 relative; three writes.
    assert float((got - want).norm() / want.norm()) < 1e-6
    rank = ed.reports[-1].batches[0].extra["nullspace_rank"]["1"]
    assert rank == int((torch.linalg.eigvalsh(ed._c0[1]) < 1e-2).sum()) and 0 < rank < 96
    assert (state_key(1) in ed.method_state) == keep
    if keep:
        assert ed.method_state[state_key(1)].shape == (96, 9)


def test_multi_layer_spread(tmp_path):
    """Two layers: each its own projector and K_p, the residual spread as R/(L−i)."""
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _alpha_editor(model, syn, tmp_path, layers=(1, 2))
    W0 = {i: ed._weight(i).detach().double().clone() for i in (1, 2)}
    reqs = _requests(4)
    ed.edit(reqs)
    d, hidden = 96, model.config.hidden_size
    Z, H = syn.values(hidden, reqs)
    for i, layer in enumerate((1, 2)):
        P = authors_projector(ed._c0[layer], 1e-2)
        want = authors_delta(((Z - H) / (2 - i)).T, syn.keys(d, reqs, layer), P, torch.zeros(d, d, dtype=torch.float64), 10.0)
        got = ed._weight(layer).detach().double() - W0[layer]
        assert float((got - want).norm() / want.norm()) < 1e-5, layer
    assert set(ed.method_state) == {state_key(1), state_key(2)}


def test_state_does_not_leak_across_restore_editors_or_failed_batches(tmp_path):
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _alpha_editor(model, syn, tmp_path)
    ed.edit(_requests(3))
    first = _weights(ed)
    ed.edit(_requests(3, 3))
    ed.restore()
    assert ed.method_state == {}
    ed.edit(_requests(3))  # after restore: exactly a fresh first batch (the cached factor is not reused)
    assert torch.equal(_weights(ed)[1], first[1])
    # a second Editor on the same (edited) model shares nothing with the first
    ed2 = _alpha_editor(model, syn, tmp_path, c0=ed._c0)
    assert ed2.method_state == {} and ed2.method_cache is not ed.method_cache
    ed.restore()
    # a failed batch commits no keys: batch 1 fails at its write, the next batch sees batch 0 only
    ed.edit(_requests(3))
    syn.on_write = lambda ctx, layer, delta: (_ for _ in ()).throw(EditError("sabotaged"))
    with pytest.raises(EditError, match="sabotaged"):
        ed.edit(_requests(4, 3))
    syn.on_write = None
    assert ed.method_state[state_key(1)].shape[1] == 3
    ed.edit(_requests(2, 7))
    want = _expected_weights(ed, syn, [_requests(3), _requests(2, 7)])
    assert float((ed._weight(1).detach().double() - want).norm() / want.norm()) < 1e-6
    ed.restore()


def test_save_load_continue_round_trip(tmp_path):
    """Two batches, save, restore, load into a new Editor, a third batch: the same weights (bit
    for bit) as three batches in one Editor."""
    syn = Synthetic()
    model = make_tiny_llama()
    ed = _alpha_editor(model, syn, tmp_path)
    for reqs in (_requests(3), _requests(3, 3), _requests(2, 6)):
        ed.edit(reqs)
    straight = _weights(ed)
    ed.restore()
    ed.edit(_requests(3))
    ed.edit(_requests(3, 3))
    path = ed.save_deltas(tmp_path / "alpha.safetensors")
    ed.restore()
    ed2 = Editor.load_deltas(model, path, tokenizer=object(), second_moments=ed._c0, progress=False,
                             cache_dir=tmp_path)
    ed2.context_class = syn.context_class()
    ed2._templates = ["{}"]
    assert ed2.method_state[state_key(1)].shape == (96, 6)
    ed2.edit(_requests(2, 6))
    assert torch.equal(_weights(ed2)[1], straight[1])
    ed2.restore()


# ------------------------------------------------------------------ projector cache
def test_eigendecomposition_cached_once_and_verified(tmp_path, monkeypatch):
    C0 = _spectrum_c0(64)
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: calls.append(1) or real(A))
    a = load_or_compute_eigh(C0, layer=3, fingerprint="fp", root=tmp_path)
    b = load_or_compute_eigh(C0, layer=3, fingerprint="fp", root=tmp_path)
    assert len(calls) == 1 and a.path == b.path and a.path.is_file()
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.values, b.values)
    ref = torch.linalg.eigvalsh(C0)
    assert torch.allclose(a.values, ref, rtol=0, atol=1e-14)
    # another C0 (one entry changed) gets its own file, never the first one's
    C1 = C0.clone()
    C1[0, 0] += 1e-9
    c = load_or_compute_eigh(C1, layer=3, fingerprint="fp", root=tmp_path)
    assert c.path != a.path and len(calls) == 2
    # a flipped byte is detected: recomputed, with a warning naming the file
    raw = bytearray(a.path.read_bytes())
    raw[-5] ^= 0xFF
    a.path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="unusable"):
        d = load_or_compute_eigh(C0, layer=3, fingerprint="fp", root=tmp_path)
    assert len(calls) == 3 and torch.equal(d.vectors, a.vectors)
    assert eigh_path(tmp_path, "fp", 3, "ab" * 32).parent == tmp_path / "fp"


def test_editor_computes_the_projector_once_per_layer(tmp_path, monkeypatch):
    syn = Synthetic()
    model = make_tiny_llama()
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: calls.append(A.shape) or real(A))
    ed = _alpha_editor(model, syn, tmp_path)
    for i in range(3):
        ed.edit(_requests(2, 2 * i))
    ed.restore()
    ed.edit(_requests(2))
    assert len(calls) == 1
    ed.restore()
    ed2 = _alpha_editor(model, syn, tmp_path, c0=ed._c0)  # a new Editor reads the disk cache
    ed2.edit(_requests(2))
    assert len(calls) == 1
    ed2.restore()


# ------------------------------------------------------------------ bad input
def test_bad_input_errors(tmp_path):
    syn = Synthetic()
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="'nullspace_threshold': must be a finite number > 0"):
        EditHparams(layers=[1], method="alphaedit", nullspace_threshold=0.0)
    with pytest.raises(ValueError, match="'l2': must be a finite number > 0"):
        EditHparams(layers=[1], method="alphaedit", l2=-1.0)
    with pytest.raises(ValueError, match="'precision'"):
        EditHparams(layers=[1], method="alphaedit", precision="fp32")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lam_e'\]"):
        EditHparams.from_dict({"layers": [1], "method": "alphaedit", "lam_e": 0.1})
    # a threshold below every eigenvalue of C0: refused before any value optimisation
    ed = _alpha_editor(model, syn, tmp_path, nullspace_threshold=1e-6)
    before = _weights(ed)
    with pytest.raises(ValueError, match=r"layer 1 \(AlphaEdit\): nullspace_threshold=1e-06 keeps no dimensions"):
        ed.edit(_requests(2))
    assert syn.calls["values"] == [] and torch.equal(_weights(ed)[1], before[1])
    with pytest.raises(ValueError, match="no requests"):
        ed.edit([])


def test_registry_presets_and_cli():
    import argparse

    from pmedit.commands.edit import add_arguments
    from pmedit.methods import get_method

    m = get_method("AlphaEdit")
    assert m.sweep_field == "l2" and not m.uses_preservation
    hp = EditHparams.preset("smollm2", method="alphaedit")
    assert (hp.layers, hp.nullspace_threshold, hp.l2, hp.keep_prior_edits) == ((4,), 2e-2, 10.0, True)
    hp = EditHparams.preset("llama3-8b", method="alphaedit")
    assert (hp.layers, hp.lr, hp.weight_decay, hp.clamp_norm_factor, hp.nullspace_threshold, hp.l2) == \
        ((4, 5, 6, 7, 8), 0.1, 0.5, 0.75, 2e-2, 10.0)
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--method", "alphaedit"]).method == "alphaedit"


# ------------------------------------------------------------------ SmolLM2 end to end
@pytest.mark.slow
def test_smollm2_counterfact_edits_stick(smollm2, shared_data):
    from pmedit.data import load_counterfact
    from pmedit.evaluation import evaluate_counterfact

    model, tok = smollm2
    records = load_counterfact(shared_data / "counterfact" / "counterfact_original_500.json", limit=4)
    hp = EditHparams.preset("smollm2", method="alphaedit", mom2_tokens=20_000, n_templates=2)
    ed = Editor(model, tok, hparams=hp, progress=False)
    try:
        ed.edit([r for r in records], batch_size=2)  # a sequence of two batches
        res = evaluate_counterfact(model, tok, records, progress=False)
        stuck = sum(r.success["rewrite"] > 0.5 for r in res.records)
        assert stuck >= 3, [r.to_dict() for r in res.records]
    finally:
        ed.restore()


# ------------------------------------------------------------------ the four experiment kinds
@pytest.mark.parametrize("kw", [
    dict(experiment="sequential-batch", batch_sizes=[1, 2], eval_points=[2]),
    dict(experiment="layer-sweep", layers=[0, 2], total_edits=3, chunk_size=2),
    dict(experiment="batch", batch_sizes=[2, 4]),
    dict(experiment="lambda-sweep", batch_sizes=[4], lambdas=[0.5, 2.0]),
], ids=["sequential-batch", "layer-sweep", "batch", "lambda-sweep"])
def test_experiments_run_alphaedit_and_encore(toy, tmp_path, monkeypatch, kw):
    """Every experiment kind runs AlphaEdit and ENCORE (the λ-sweep varies l2 and mu); a
    sequential run interrupted inside the B=1 sequence resumes from its deltas checkpoint (kept
    keys and AlphaEdit's state) to the same rows."""
    from pmedit.experiments import ExperimentConfig, run_experiment
    from test_experiments import HP, Stop, _interrupt_after, _metrics

    monkeypatch.setenv("PMEDIT_CACHE", str(tmp_path / "cache"))
    model, tok, data, c0 = toy
    base = dict(data=str(data), layers=[1], methods=["alphaedit", "encore"], total_edits=4, preset=None,
                hparams=dict(HP, nullspace_threshold=1.0, mu=0.5), eval={"batch_size": 8})
    cfg = ExperimentConfig.from_dict({**base, **kw})
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "a", progress=False, second_moments=c0)
    methods = {r["method"] for r in full["rows"]}
    assert {"alphaedit", "encore"} <= methods
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())
    if kw["experiment"] == "sequential-batch":
        with pytest.raises(Stop):
            run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "b", progress=False,
                           second_moments=c0, on_unit=_interrupt_after(3))
        resumed = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "b", progress=False,
                                 second_moments=c0)
        assert _metrics(resumed["rows"]) == _metrics(full["rows"])
        assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())
