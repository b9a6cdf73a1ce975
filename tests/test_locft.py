"""LocFT-BF (pmedit.methods.locft): against a plain reference training loop on a tiny Llama,
the Editor's guarantees (atomic batches, exact restore, deltas, sequential batches), bad input,
availability everywhere a method is named, and real edits on SmolLM2."""
from __future__ import annotations

import argparse
import json
import string

import pytest
import torch

from conftest import make_tiny_llama
from pmedit.editor import EditError, Editor
from pmedit.hparams import EditHparams
from pmedit.methods import EditContext, method_names
from pmedit.methods import locft
from pmedit.requests import EditRequest

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _char_tokenizer(eos: bool = True):
    """One token per printable character, no BOS/EOS added by calls; EOS exists unless ``eos=False``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *chars])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    special = {"eos_token": "[EOS]"} if eos else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", **special)
    tok.padding_side = "right"
    return tok


def _requests(n: int, start: int = 0) -> list[EditRequest]:
    cities = ["Rome", "Oslo", "Lima", "Kyiv", "Bern", "Doha", "Riga", "Baku", "Male"]
    return [EditRequest(prompt="{} lives in", subject=f"Person {i}", target_new=cities[i % len(cities)], case_id=i)
            for i in range(start, start + n)]


def _hp(layers=(1,), **kw) -> EditHparams:
    base = dict(ft_lr=1e-2, epochs=4, minibatch_size=3, ft_loss_stop=0.0, seed=0)
    base.update(kw)
    return EditHparams(method="locft-bf", layers=list(layers), **base)


def _editor(model, tok, hp, **kw) -> Editor:
    return Editor(model, tok, hparams=hp, progress=False, templates=["{}"], **kw)


def _tiny(dtype=torch.float64, seed=0):
    return make_tiny_llama(vocab=128, hidden=32, intermediate=48, layers=3, seed=seed).to(dtype)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ the plain reference loop


def _reference(model, tok, reqs, *, layer, lr, epochs, minibatch, stop, seed, weight_decay=0.0):
    """Breadth-first fine-tuning written out plainly, from the published description and the
    authors' fine-tune.py: full-vocabulary logits, shifted cross-entropy masked to the target
    (+ EOS), per-sequence mean, batch mean, torch.optim.Adam; a mini-batch below ``stop`` takes
    no step; stop after an epoch whose mean loss is below ``stop``. Shuffle: torch.randperm on a
    generator seeded with ``seed``, once per epoch (pmedit's documented order). Returns (the
    trained weight, the per-epoch losses); the model's weight is put back."""
    seqs = []
    for r in reqs:
        p = tok(r.prompt.replace("{}", r.subject), add_special_tokens=False)["input_ids"]
        t = tok(" " + r.target_new, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((p + t, len(p)))
    W = model.model.layers[layer].mlp.down_proj.weight
    W0 = W.detach().clone()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    W.requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    epoch_losses = []
    for _ in range(epochs):
        order = torch.randperm(len(seqs), generator=g).tolist()
        total = 0.0
        for s in range(0, len(seqs), minibatch):
            batch = [seqs[i] for i in order[s:s + minibatch]]
            T = max(len(x) for x, _ in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            att = torch.zeros(len(batch), T, dtype=torch.long)
            lab = torch.zeros(len(batch), T, dtype=torch.bool)
            for b, (x, plen) in enumerate(batch):
                ids[b, :len(x)] = torch.tensor(x)
                att[b, :len(x)] = 1
                lab[b, plen:len(x)] = True
            logits = model(input_ids=ids, attention_mask=att).logits
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1), reduction="none").view(len(batch), -1)
            m = lab[:, 1:]
            loss = ((ce * m).sum(1) / m.sum(1)).mean()
            total += loss.item() * len(batch)
            if loss.item() >= stop:
                opt.zero_grad()
                loss.backward()
                opt.step()
        epoch_losses.append(total / len(seqs))
        if total / len(seqs) < stop:
            break
    trained = W.detach().clone()
    with torch.no_grad():
        W.copy_(W0)
    for p, f in flags:
        p.requires_grad_(f)
    return trained, epoch_losses


@pytest.mark.parametrize("n, minibatch, epochs, stop", [(7, 3, 4, 0.0), (5, 100, 3, 0.0), (6, 2, 12, None)],
                         ids=["3-per-step", "one-minibatch", "loss-stop"])
def test_matches_reference_loop(n, minibatch, epochs, stop):
    tok = _char_tokenizer()
    model = _tiny()
    reqs = _requests(n)
    if stop is None:  # a threshold the run crosses between its 4th and 5th epoch
        _, free = _reference(model, tok, reqs, layer=1, lr=1e-2, epochs=5, minibatch=minibatch, stop=0.0, seed=3)
        stop = (free[3] + free[4]) / 2
    W_ref, losses_ref = _reference(model, tok, reqs, layer=1, lr=1e-2, epochs=epochs, minibatch=minibatch,
                                   stop=stop, seed=3)
    ed = _editor(model, tok, _hp(minibatch_size=minibatch, epochs=epochs, ft_loss_stop=stop, seed=3))
    report = ed.edit(reqs)
    W = ed._weight(1).detach()
    extra = report.batches[0].extra
    assert extra["locft_epoch_losses"] == pytest.approx(losses_ref, rel=1e-9, abs=1e-12)
    err = float((W - W_ref).abs().max())
    moved = float((W_ref - ed._original[1]).abs().max())
    assert moved > 1e-3 and err < 1e-9 * max(1.0, moved), (err, moved)
    if stop > 0:  # stopped by the loss rule, before the last epoch
        assert extra["locft_stopped_early"] and losses_ref[-1] < stop <= min(losses_ref[:-1])
    ed.restore()


def test_only_the_tuned_weight_changes_and_flags_are_restored():
    tok = _char_tokenizer()
    model = _tiny()
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)  # a mixed set of flags must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _params(model)
    model.train()
    ed = _editor(model, tok, _hp(layers=(0, 2)))
    ed.edit(_requests(4))
    assert model.training  # the mode is put back too (training itself ran in eval mode)
    tuned = {"model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n], n
        assert p.grad is None, n
        assert torch.equal(p, before[n]) != (n in tuned), n


def test_deterministic_under_seed_and_order_matters():
    tok = _char_tokenizer()
    reqs = _requests(6)
    runs = {}
    for key, seed in (("a", 5), ("b", 5), ("c", 6)):
        model = _tiny(torch.float32)
        ed = _editor(model, tok, _hp(seed=seed, minibatch_size=2))
        ed.edit(reqs)
        runs[key] = ed._weight(1).detach().clone()
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"])  # another shuffle, another trajectory


def test_report_has_per_epoch_losses_and_final_losses():
    tok = _char_tokenizer()
    model = _tiny()
    rep = _editor(model, tok, _hp(epochs=6, ft_lr=2e-2)).edit(_requests(5)).batches[0]
    ex = rep.extra
    assert ex["locft_epochs"] == 6 == len(ex["locft_epoch_losses"]) and ex["locft_steps"] == 6 * 2
    assert ex["locft_epoch_losses"][-1] < ex["locft_epoch_losses"][0]
    assert len(rep.value_losses) == 5 and rep.value_steps == [6] * 5
    # final per-request losses are measured after the last step: below the last epoch's pre-step mean
    assert sum(rep.value_losses) / 5 < ex["locft_epoch_losses"][-1]
    json.dumps(rep.to_dict())  # the report stays JSON-able


def test_loss_stop_skips_minibatches_and_changes_nothing_when_reached():
    tok = _char_tokenizer()
    model = _tiny()
    before = _params(model)
    ed = _editor(model, tok, _hp(ft_loss_stop=1e3))
    rep = ed.edit(_requests(4)).batches[0]
    assert rep.extra["locft_steps"] == 0 and rep.extra["locft_skipped_minibatches"] == 2
    assert rep.extra["locft_epochs"] == 1 and rep.extra["locft_stopped_early"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_no_statistics_are_collected(tmp_path):
    tok = _char_tokenizer()
    model = _tiny()
    ed = Editor(model, tok, hparams=_hp(), cache_dir=tmp_path, progress=False)
    ed.edit(_requests(3))
    assert ed.n_edits == 3 and not any(tmp_path.rglob("*"))  # uses_preservation=False: no C0, no cache


# ------------------------------------------------------------------ the Editor's guarantees


def test_nan_loss_and_interrupt_leave_the_model_unchanged(monkeypatch):
    tok = _char_tokenizer()
    model = _tiny()
    W_init = _params(model)
    ed = _editor(model, tok, _hp(epochs=3))
    ed.edit(_requests(3))  # an earlier batch, which must survive the failed ones
    after_first = _params(model)
    assert not torch.equal(after_first["model.layers.1.mlp.down_proj.weight"],
                           W_init["model.layers.1.mlp.down_proj.weight"])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    real = locft.sequence_losses

    def failing(kind, at):
        calls = []

        def fn(*a, **k):
            calls.append(1)
            out = real(*a, **k)
            if len(calls) == at:  # mid-training: the weight has already moved in place
                if kind == "nan":
                    return out * float("nan")
                raise KeyboardInterrupt
            return out

        return fn

    # 3 requests, mini-batches of 3, 3 epochs: calls 1-3 train, call 4 is the final scoring pass
    for kind, at, exc, match in (("nan", 2, EditError, r"loss is nan at epoch 2/3, mini-batch 1 \(case_ids \[1"),
                                 ("nan", 4, EditError, "after LocFT-BF training the loss of 3 request"),
                                 ("interrupt", 3, KeyboardInterrupt, None)):
        monkeypatch.setattr(locft, "sequence_losses", failing(kind, at))
        with pytest.raises(exc, match=match):
            ed.edit(_requests(3, start=10))
        now = _params(model)
        assert all(torch.equal(now[n], after_first[n]) for n in now), kind
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
        assert ed.n_edits == 3
    monkeypatch.setattr(locft, "sequence_losses", real)

    class InterruptedWrite(EditContext):
        def write(self, layer, delta):
            if layer == 2:  # layer 0 is written when layer 2's write is interrupted
                raise KeyboardInterrupt
            super().write(layer, delta)

    ed2 = _editor(model, tok, _hp(layers=(0, 2)), context_class=InterruptedWrite)
    with pytest.raises(KeyboardInterrupt):
        ed2.edit(_requests(3))
    now = _params(model)
    assert all(torch.equal(now[n], after_first[n]) for n in now)
    ed.restore()
    assert all(torch.equal(p, W_init[n]) for n, p in model.named_parameters())


def test_restore_save_and_load_deltas(tmp_path):
    tok = _char_tokenizer()
    model = _tiny(torch.float32)
    W0 = _params(model)
    ids = torch.tensor([tok("Person 1 lives in")["input_ids"]])
    ed = _editor(model, tok, _hp(epochs=5, ft_lr=3e-2))
    ed.edit(_requests(4))
    with torch.no_grad():
        edited = model(input_ids=ids).logits.clone()
    path = ed.save_deltas(tmp_path / "locft.safetensors")
    ed.restore()
    assert all(torch.equal(p, W0[n]) for n, p in model.named_parameters())
    loaded = Editor.load_deltas(model, path, tokenizer=tok, progress=False)
    assert loaded.method == "locft-bf" and loaded.hparams == ed.hparams and loaded.n_edits == 4
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, edited)
    loaded.edit(_requests(2, start=4))  # continuing the sequence from the file
    assert loaded.n_edits == 6
    loaded.restore()
    assert all(torch.equal(p, W0[n]) for n, p in model.named_parameters())


def test_sequential_batches_are_separate_breadth_first_runs():
    """batch_size=3 over 6 requests is exactly two edit calls of 3: each batch trains alone
    (its own shuffle, its own Adam state) on the weights the previous one left."""
    tok = _char_tokenizer()
    reqs = _requests(6)
    model = _tiny(torch.float32)
    ed = _editor(model, tok, _hp(minibatch_size=2))
    rep = ed.edit(reqs, batch_size=3)
    one_call = ed._weight(1).detach().clone()
    assert [b.case_ids for b in rep.batches] == [[0, 1, 2], [3, 4, 5]]
    assert all(len(b.extra["locft_epoch_losses"]) == 4 for b in rep.batches)
    ed.restore()
    ed.edit(reqs[:3])
    ed.edit(reqs[3:])
    assert torch.equal(ed._weight(1), one_call)
    ed.restore()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_train_through_an_fp32_master(dtype):
    tok = _char_tokenizer()
    model = _tiny(dtype)
    before = _params(model)
    ed = _editor(model, tok, _hp(epochs=3))
    rep = ed.edit(_requests(4))
    W = ed._weight(1)
    assert W.dtype == dtype and bool(torch.isfinite(W).all()) and not torch.equal(W, before["model.layers.1.mlp.down_proj.weight"])
    assert rep.batches[0].extra["locft_epoch_losses"][-1] < rep.batches[0].extra["locft_epoch_losses"][0]
    ed.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kw, match", [
    (dict(ft_lr=0.0), "'ft_lr': must be > 0"),
    (dict(ft_lr=3.0), "'ft_lr': 3.0 is above 1"),
    (dict(epochs=0), "'epochs': must be >= 1"),
    (dict(minibatch_size=0), "'minibatch_size': must be >= 1"),
    (dict(ft_loss_stop=-1.0), "'ft_loss_stop': must be >= 0"),
    (dict(ft_weight_decay=-0.1), "'ft_weight_decay': must be >= 0"),
    (dict(seed=-1), "'seed': must be >= 0"),
    (dict(epochs=2.5), "'epochs': expected an integer"),
    (dict(lam_e=0.1), r"unknown key\(s\) \['lam_e'\]"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        EditHparams.from_dict({"method": "locft-bf", "layers": [1], **kw})


def test_bad_requests_and_tokenizer_fail_before_training(monkeypatch):
    model = _tiny()
    before = _params(model)
    calls = []
    real = locft.sequence_losses
    monkeypatch.setattr(locft, "sequence_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    ed = _editor(model, _char_tokenizer(eos=False), _hp())
    with pytest.raises(ValueError, match="appends EOS .*append_eos=false"):
        ed.edit(_requests(2))
    ed = _editor(model, _char_tokenizer(), _hp())
    with pytest.raises(ValueError, match="no requests"):
        ed.edit([])
    with pytest.raises(ValueError, match="request 1 .*target_new"):
        ed.edit([_requests(1)[0], {"prompt": "{} is", "subject": "X", "target_new": ""}])
    with pytest.raises(ValueError, match="layer"):
        _editor(model, _char_tokenizer(), _hp(layers=(7,)))
    assert not calls and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # without EOS the same tokenizer works once append_eos is off
    _editor(model, _char_tokenizer(eos=False), _hp(append_eos=False, epochs=1)).edit(_requests(2))


# ----------------------------------------------------------------- available everywhere


def test_registry_presets_and_cli():
    from pmedit.commands.edit import _hparams, add_arguments

    assert "locft-bf" in method_names()
    hp = EditHparams.preset("llama3-8b", method="locft-bf")
    assert (hp.layers, hp.ft_lr, hp.minibatch_size, hp.epochs, hp.ft_loss_stop, hp.ft_weight_decay) == \
        ((22,), 5e-4, 100, 25, 1e-2, 0.0)
    smol = EditHparams.preset("smollm2", method="locft-bf")
    assert smol.layers == tuple(locft.METHOD.presets["smollm2"]["layers"])
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert _hparams(p.parse_args(["--method", "locft-bf"])) == smol  # the method's own preset applies
    assert _hparams(p.parse_args(["--method", "locft-bf", "--preset", "llama3-8b"])) == hp
    assert _hparams(p.parse_args(["--method", "locft-bf", "--layers", "3"])).layers == (3,)
    assert locft.METHOD.sweep_field == "ft_lr" and not locft.METHOD.uses_preservation
    assert EditHparams.from_json(smol.to_json()) == smol


def _records():
    subjects = ["Alpha Romeo", "Bravo Town", "Charlie Hill", "Delta Lake"]
    return [{
        "case_id": 100 + i,
        "requested_rewrite": {"prompt": "{} is located in", "subject": s, "target_new": {"str": ["Paris", "Rome"][i % 2]},
                              "target_true": {"str": ["Berlin", "Lima"][i % 2]}},
        "paraphrase_prompts": [f"People say {s} is in"],
        "neighborhood_prompts": [f"{subjects[(i + 1) % 4]} lies in"],
        "attribute_prompts": [], "generation_prompts": [f"{s} is a place where"],
    } for i, s in enumerate(subjects)]


@pytest.mark.parametrize("kw", [
    dict(experiment="layer-sweep", layers=[0, 2], total_edits=2, chunk_size=2),
    dict(experiment="batch", batch_sizes=[2, 4]),
    dict(experiment="sequential-batch", batch_sizes=[2]),
    dict(experiment="lambda-sweep", batch_sizes=[4], lambdas=[1e-3, 3e-2]),
], ids=["layer-sweep", "batch", "sequential-batch", "lambda-sweep"])
def test_every_experiment_kind_runs(tmp_path, kw):
    from pmedit.experiments import ExperimentConfig, run_experiment

    tok = _char_tokenizer()
    model = _tiny(torch.float32)
    W0 = _params(model)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records()))
    base = dict(data=str(data), layers=[1], methods=["locft-bf"], total_edits=4, hparams={"epochs": 3, "ft_lr": 1e-2},
                preset=None, eval={"batch_size": 8})
    cfg = ExperimentConfig.from_dict({**base, **kw})
    res = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "run", progress=False, plot=False)
    rows = [r for r in res["rows"] if r["method"] == "locft-bf"]
    assert rows and all(r["es"] is not None for r in rows)
    assert all(torch.equal(p, W0[n]) for n, p in model.named_parameters())  # every unit restored
    if kw["experiment"] == "lambda-sweep":  # the sweep varies ft_lr: a larger lr moves the edits further
        state = json.loads((tmp_path / "run" / "state.json").read_text())["units"]
        mags = [state[f"locft-bf/lam{x:g}"]["summary"]["es_mag"] for x in (1e-3, 3e-2)]
        assert mags[0] < mags[1], mags


def test_layer_sweep_dense_deltas_score_like_the_edited_weights(tmp_path):
    """A LocFT-BF single edit is a dense update: the sweep's GroupDeltas hook scores must equal
    editing the fact and scoring on the edited weights."""
    from pmedit.data import load_counterfact, select
    from pmedit.evaluation import evaluate_counterfact
    from pmedit.experiments import ExperimentConfig, run_experiment

    tok = _char_tokenizer()
    model = _tiny(torch.float32)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records()))
    cfg = ExperimentConfig.from_dict(dict(data=str(data), layers=[1], methods=["locft-bf"], total_edits=2,
                                          experiment="layer-sweep", chunk_size=2, baseline=False,
                                          hparams={"epochs": 3, "ft_lr": 1e-2}, preset=None, eval={"batch_size": 8}))
    run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "run", progress=False, plot=False)
    swept = json.loads((tmp_path / "run" / "state.json").read_text())["units"]["locft-bf/L1/chunk0"]["records"]
    ed = Editor(model, tok, hparams=cfg.edit_hparams("locft-bf"), progress=False)
    for rec, got in zip(select(load_counterfact(data), 2, seed=cfg.seed), swept):  # the runner's records
        ed.edit([rec.as_memit_dict()])
        ref = evaluate_counterfact(model, tok, [rec], batch_size=8, progress=False).records[0]
        ed.restore()
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            assert got["magnitude"][kind] == pytest.approx(ref.magnitude[kind], abs=1e-5)


# ------------------------------------------------------------------------------ SmolLM2


def test_smollm2_counterfact_edits_stick(smollm2, shared_data):
    """The SmolLM2 preset on 4 CounterFact records in one batch: at least 3 of 4 greedy
    completions start with target_new afterwards (none did before), and restore is exact."""
    from pmedit.commands.edit import greedy_completions
    from pmedit.data import load_counterfact, select

    model, tok = smollm2
    records = select(load_counterfact(shared_data / "counterfact" / "counterfact_original_500.json"), 4, seed=0)
    reqs = [r.to_request() for r in records]
    prompts = [r.filled_prompt for r in reqs]
    hit = lambda outs: [o.strip().startswith(r.target_new.strip()) for r, o in zip(reqs, outs)]  # noqa: E731
    assert not any(hit(greedy_completions(model, tok, prompts, 4)))
    ed = Editor(model, tok, hparams=EditHparams.preset("smollm2", method="locft-bf"), progress=False)
    W0 = ed._weight(ed.layers[0]).detach().clone()
    try:
        rep = ed.edit(reqs)
        outs = greedy_completions(model, tok, prompts, 4)
        assert sum(hit(outs)) >= 3, (outs, [r.target_new for r in reqs], rep.batches[0].extra)
    finally:
        ed.restore()
    assert torch.equal(ed._weight(ed.layers[0]), W0)
