"""pmedit.experiments at toy scale: a tiny random Llama with SmolLM2's tokenizer, hand-built
CounterFact records, a given C0; each experiment run whole, interrupted and resumed to the
same result; the CLI end to end with a model saved to disk."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama
from pmedit.experiments import ExperimentConfig, plan, report_experiment, run_experiment

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


SUBJECTS = ["Alpha Romeo", "Bravo Town", "Charlie Hill", "Delta Lake", "Echo Park", "Foxtrot Bay"]


def _records():
    out = []
    for i, s in enumerate(SUBJECTS):
        out.append({
            "case_id": 100 + i,
            "requested_rewrite": {
                "prompt": "{} is located in", "subject": s,
                "target_new": {"str": ["Paris", "Rome", "Tokyo"][i % 3]},
                "target_true": {"str": ["Berlin", "Madrid", "Lima"][i % 3]},
            },
            "paraphrase_prompts": [f"People say {s} is in"],
            "neighborhood_prompts": [f"{SUBJECTS[(i + 1) % 6]} lies in", "The river is in"],
            "attribute_prompts": [],
            "generation_prompts": [f"{s} is a place where"],
        })
    return out


HP = {"steps": 2, "n_templates": 1, "template_length": 3, "lr": 0.5, "value_batch_size": 4, "key_batch_size": 8}


@pytest.fixture(scope="module")
def toy(smollm2, tmp_path_factory):
    _, tok = smollm2
    model = make_tiny_llama(vocab=len(tok), hidden=32, intermediate=48, layers=3, seed=0)
    d = tmp_path_factory.mktemp("toy")
    data = d / "cf.json"
    data.write_text(json.dumps(_records()))
    g = torch.Generator().manual_seed(0)
    A = torch.randn(48, 200, generator=g, dtype=torch.float64)
    c0 = {layer: A @ A.T / 200 for layer in range(3)}  # a well-conditioned SPD stand-in for C0
    return model, tok, data, c0


def _cfg(data, **kw):
    base = dict(data=str(data), layers=[1], methods=["memit"], total_edits=4, hparams=dict(HP), preset=None,
                eval={"batch_size": 8}, value_store=str(data.parent / "values"))
    base.update(kw)
    return ExperimentConfig.from_dict(base)


def _metrics(rows):
    """Everything but wall-clock times, which legitimately differ between runs."""
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


class Stop(Exception):
    pass


def _interrupt_after(n):
    seen = []

    def cb(key):
        seen.append(key)
        if len(seen) == n:
            raise Stop(key)

    return cb


@pytest.mark.parametrize(
    "kw, stop_after",
    [
        (dict(experiment="sequential-batch", batch_sizes=[1, 2], eval_points=[2]), 3),  # inside the B=1 sequence
        (dict(experiment="layer-sweep", layers=[0, 2], total_edits=3, chunk_size=2), 2),
        (dict(experiment="batch", batch_sizes=[2, 4], methods=["memit", "emmet"]), 2),
        (dict(experiment="lambda-sweep", batch_sizes=[4], lambdas=[0.5, 2.0], methods=["emmet"]), 1),
    ],
    ids=["sequential-batch", "layer-sweep", "batch", "lambda-sweep"],
)
def test_interrupted_run_resumes_to_the_same_result(toy, tmp_path, kw, stop_after):
    model, tok, data, c0 = toy
    cfg = _cfg(data, **kw)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "a", progress=False, second_moments=c0)
    with pytest.raises(Stop):
        run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "b", progress=False, second_moments=c0,
                       on_unit=_interrupt_after(stop_after))
    # an interruption leaves the caller's model unedited
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())
    state_bytes = (tmp_path / "b" / "state.json").read_bytes()
    state = json.loads(state_bytes)
    assert len(state["units"]) == stop_after
    # a report of the finished units: rows of the full run, the state only read
    rep = report_experiment(cfg, out_dir=tmp_path / "b", plot=False)
    assert rep["units"] == {"done": stop_after, "total": len(plan(cfg))}
    assert all(r in _metrics(full["rows"]) for r in _metrics(rep["rows"]))
    assert len(rep["rows"]) < len(full["rows"])
    assert (tmp_path / "b" / "state.json").read_bytes() == state_bytes
    assert json.loads((tmp_path / "b" / "results.json").read_text())["units"]["done"] == stop_after
    resumed = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "b", progress=False,
                             second_moments=c0)
    assert _metrics(resumed["rows"]) == _metrics(full["rows"])
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())
    for name in ("results.json", "results.csv", f"{cfg.experiment}.png"):
        assert (tmp_path / "b" / name).stat().st_size > 0
    n = len(plan(cfg))
    assert json.loads((tmp_path / "b" / "results.json").read_text())["units"] == {"done": n, "total": n}
    csv_lines = (tmp_path / "b" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == len(full["rows"]) + 1
    assert full["rows"][0]["method"] == "none"  # the unedited baseline comes first
    assert not (tmp_path / "b" / "checkpoints").exists() or not any((tmp_path / "b" / "checkpoints").iterdir())


def test_layer_sweep_scores_equal_editing_each_fact_alone(toy, tmp_path):
    """The sweep's hook-based singular scores must equal: edit the one fact with the Editor,
    evaluate that record on the edited weights, restore."""
    from pmedit.data import load_counterfact
    from pmedit.editor import Editor
    from pmedit.evaluation import evaluate_counterfact

    model, tok, data, c0 = toy
    cfg = _cfg(data, experiment="layer-sweep", layers=[1], total_edits=2, chunk_size=2, baseline=False)
    run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path, progress=False, second_moments=c0, plot=False)
    swept = json.loads((tmp_path / "state.json").read_text())["units"]["memit/L1/chunk0"]["records"]
    recs = load_counterfact(data, limit=2)
    ed = Editor(model, tok, hparams=cfg.edit_hparams("memit"), second_moments={1: c0[1]}, progress=False)
    for rec, got in zip(recs, swept):
        ed.edit([rec.as_memit_dict()])
        ref = evaluate_counterfact(model, tok, [rec], batch_size=8, progress=False).records[0]
        ed.restore()
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            # hook (x·v)u vs weights W+uvᵀ: fp32 reassociation only
            assert got["magnitude"][kind] == pytest.approx(ref.magnitude[kind], abs=1e-5)
            # a random model's two targets can tie to 1e-6, where rounding may flip the
            # comparison; rewrite and paraphrase have one prompt each here, so their magnitude
            # is that prompt's margin
            if kind != "neighborhood" and abs(ref.magnitude[kind]) > 1e-4:
                assert got["success"][kind] == ref.success[kind]


def test_plan_and_resume_guard(toy, tmp_path):
    _, _, data, _ = toy
    seq = _cfg(data, experiment="sequential-batch", batch_sizes=[2, 4])
    assert [u.key for u in plan(seq)] == ["baseline", "memit/S2/batch0", "memit/S2/batch1", "memit/S4/batch0"]
    sweep = _cfg(data, experiment="layer-sweep", layers=[0, 1], total_edits=3, chunk_size=2, baseline=False)
    assert [u.key for u in plan(sweep)] == ["memit/L0/chunk0", "memit/L0/chunk1", "memit/L1/chunk0", "memit/L1/chunk1"]
    from pmedit.experiments.store import RunStore

    RunStore(tmp_path, seq.to_dict())
    with pytest.raises(ValueError, match=r"different config \(fields \['batch_sizes'\] differ\)"):
        RunStore(tmp_path, _cfg(data, experiment="sequential-batch", batch_sizes=[4]).to_dict())
    # a report reads a run of its own config only
    with pytest.raises(ValueError, match="different config"):
        report_experiment(_cfg(data, experiment="sequential-batch", batch_sizes=[4]), out_dir=tmp_path, plot=False)
    with pytest.raises(FileNotFoundError, match="no run state"):
        report_experiment(seq, out_dir=tmp_path / "elsewhere", plot=False)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(experiment="nope"), "is not one of"),
        (dict(experiment="batch", batch_sizes=[2], bogus=1), r"unknown key\(s\) \['bogus'\]"),
        (dict(experiment="batch", batch_sizes=[]), "needs at least one"),
        (dict(experiment="batch", batch_sizes=[8]), "exceed total_edits=4"),
        (dict(experiment="sequential-batch", batch_sizes=[3]), r"\[3\] do not divide total_edits=4"),
        (dict(experiment="batch", batch_sizes=[2], layers=[1, 2]), "edits one layer"),
        (dict(experiment="batch", batch_sizes=[2], methods=["mend"]), "field 'methods'"),
        (dict(experiment="lambda-sweep", batch_sizes=[2], lambdas=[]), "field 'lambdas'"),
        (dict(experiment="batch", batch_sizes=[2], eval={"entropyy": True}), r"field 'eval': unknown key"),
        (dict(experiment="batch", batch_sizes=[2], hparams={"layers": [3]}), "experiment's own field"),
        (dict(experiment="batch", batch_sizes=[2], eval={"ge_data": "x.json", "entropy": True}), "use one"),
        (dict(experiment="batch", batch_sizes=[2], eval={"ge_records": 0}), "eval.ge_records"),
    ],
)
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path / "x.json", **kw)


def test_cli_end_to_end(smollm2, tmp_path, monkeypatch):
    """``pmedit experiment batch --config FILE`` on a tiny model saved to disk; C0 collected
    from a small text file (not given), cached under a temporary PMEDIT_CACHE."""
    from pmedit.cli import main

    _, tok = smollm2
    monkeypatch.setenv("PMEDIT_CACHE", str(tmp_path / "cache"))
    mdir = tmp_path / "model"
    make_tiny_llama(vocab=len(tok), hidden=32, intermediate=48, layers=2, seed=1).save_pretrained(mdir)
    tok.save_pretrained(mdir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence number {i} talks about towns, rivers and lakes." for i in range(60)))
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records()))
    cfg = {
        "experiment": "batch", "model": str(mdir), "data": str(data), "layers": [1], "methods": ["emmet"],
        "total_edits": 2, "batch_sizes": [2], "preset": None, "baseline": False,
        "hparams": dict(HP, mom2_corpus=str(corpus), mom2_tokens=200), "eval": {"batch_size": 8},
        "out_dir": str(tmp_path / "run"),
    }
    cpath = tmp_path / "batch.json"
    cpath.write_text(json.dumps(cfg))
    assert main(["experiment", "batch", "--config", str(cpath), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["method"] == "emmet" and rows[0]["n_edits"] == 2
    assert 0.0 <= rows[0]["es"] <= 100.0
    assert (tmp_path / "run" / "batch.png").is_file()
    # --report rewrites the results from the run state without running; no state: exit 2
    (tmp_path / "run" / "results.json").unlink()
    assert main(["experiment", "batch", "--config", str(cpath), "--report", "--no-plot"]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["rows"] == rows and res["units"] == {"done": 1, "total": 1}
    assert main(["experiment", "batch", "--config", str(cpath), "--report", "--out-dir", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()
    # the name on the command line must match the config
    assert main(["experiment", "layer-sweep", "--config", str(cpath), "--no-progress"]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kill_between_checkpoint_and_state_resumes(toy, tmp_path, monkeypatch, dtype):
    """A sequence interrupted after a batch's checkpoint is written but before the run state
    records the unit resumes (from the checkpoint the state expects) to the uninterrupted result,
    bit for bit also on a 16-bit model."""
    from pmedit.experiments.store import RunStore

    model, tok, data, c0 = toy
    model = make_tiny_llama(vocab=len(tok), hidden=32, intermediate=48, layers=3, seed=0).to(dtype)
    cfg = _cfg(data, experiment="sequential-batch", batch_sizes=[1], eval_points=[2], baseline=False)
    full = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "a", progress=False, second_moments=c0,
                          plot=False)
    real_put = RunStore.put

    def killed_put(self, key, result):
        if key == "memit/S1/batch1":  # its checkpoint (2 edits) is on disk, the state not yet
            raise Stop(key)
        real_put(self, key, result)

    monkeypatch.setattr(RunStore, "put", killed_put)
    with pytest.raises(Stop):
        run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "b", progress=False, second_moments=c0,
                       plot=False)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["memit_S1.1.safetensors", "memit_S1.2.safetensors"]
    monkeypatch.setattr(RunStore, "put", real_put)
    resumed = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "b", progress=False,
                             second_moments=c0, plot=False)
    assert _metrics(resumed["rows"]) == _metrics(full["rows"])
    assert not any((tmp_path / "b" / "checkpoints").iterdir())


def test_independent_batches_equal_separate_edits(toy, tmp_path):
    """The batch experiment at B scores every record under its own batch's update: equal (to
    fp32 reassociation, 1e-6) to editing each batch alone with the Editor and scoring its records.
    MEMIT and EMMET share every key and value through the store."""
    from pmedit.data import load_counterfact, select
    from pmedit.editor import Editor
    from pmedit.evaluation import evaluate_counterfact
    from pmedit.evaluation.metrics import summarize

    model, tok, data, c0 = toy
    cfg = _cfg(data, experiment="batch", batch_sizes=[2], methods=["memit", "emmet"], baseline=False,
               value_store=str(tmp_path / "vs"))
    res = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "run", progress=False,
                         second_moments=c0, plot=False)
    assert res["value_store"]["lookups"] == 16 and res["value_store"]["computed"] == 8
    assert res["value_store"]["reuse_factor"] == 2.0
    recs = select(load_counterfact(data), 4, seed=cfg.seed)
    for row in res["rows"]:
        assert row["n_edits"] == 4 and row["n_groups"] == 2
        ed = Editor(model, tok, hparams=cfg.edit_hparams(row["method"]), second_moments={1: c0[1]}, progress=False)
        scores = []
        for s in (0, 2):
            ed.edit([r.as_memit_dict() for r in recs[s:s + 2]])
            scores += evaluate_counterfact(model, tok, recs[s:s + 2], batch_size=8, progress=False).records
            ed.restore()
        want = summarize(scores)
        for k in ("es_mag", "ps_mag", "ns_mag"):
            assert row[k] == pytest.approx(want[k], abs=1e-6), (row["method"], k)
        for k in ("es", "ps", "ns"):
            assert row[k] == want[k], (row["method"], k)
    # the study's literal protocol stays available: the first B records in one batch
    first = _cfg(data, experiment="batch", batch_sizes=[2], baseline=False, batch_protocol="first-b")
    rows = run_experiment(first, model=model, tokenizer=tok, out_dir=tmp_path / "lit", progress=False,
                          second_moments=c0, plot=False)["rows"]
    assert rows[0]["n_edits"] == 2


def _units(root):
    return json.loads((root / "state.json").read_text())["units"]


def test_sequential_checkpoints_every_max_records_and_probes(toy, tmp_path):
    """eval.every adds checkpoints, eval.max_records scores a fixed-size sample of the edits so
    far, probes run at the baseline and at every checkpoint, and each row carries bootstrap
    intervals around its CounterFact figures."""
    model, tok, data, c0 = toy
    text = tmp_path / "heldout.txt"
    text.write_text("The city lies on a river. It has a bridge and a market. " * 20)
    cfg = _cfg(data, experiment="sequential-batch", batch_sizes=[1], eval={
        "batch_size": 8, "every": 2, "max_records": 2, "probes": ["perplexity"],
        "settings": {"perplexity": {"text": str(text), "tokens": 64, "window": 32}}})
    res = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "r", progress=False, second_moments=c0)
    rows = res["rows"]
    assert [r["n_edits"] for r in rows] == [0, 2, 4]
    assert all(r["ppl"] is not None and r["ppl"] > 1 for r in rows)
    units = _units(tmp_path / "r")
    assert "summary" not in units["memit/S1/batch0"] and "summary" not in units["memit/S1/batch2"]
    assert units["memit/S1/batch1"]["summary"]["n_records"] == 2
    assert units["memit/S1/batch3"]["summary"]["n_records"] == 2  # 4 edits so far, a sample of 2
    for r in rows:
        assert r["es_lo"] <= r["es"] <= r["es_hi"] and r["score_lo"] <= r["score"] <= r["score_hi"]
    assert (tmp_path / "r" / "sequential-batch-progress.png").stat().st_size > 0
    # the Markdown table of the rows, with the intervals (scripts/results_table.py)
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("results_table", Path(__file__).parents[1] / "scripts" / "results_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    md = mod.table(rows, mod.DEFAULT).splitlines()
    assert len(md) == 2 + len(rows) and md[0].startswith("| method | B | edits | ES | PS | NS | S | ppl")
    assert f"{rows[-1]['es']:.1f} [{rows[-1]['es_lo']:.1f}, {rows[-1]['es_hi']:.1f}]" in md[-1]
    # a run in progress (state only): its table and figure from the finished units
    mid = tmp_path / "mid"
    mid.mkdir()
    (mid / "state.json").write_text((tmp_path / "r" / "state.json").read_text())
    assert mod.main([str(mid), "--plot", str(mid / "so-far.png")]) == 0
    assert (mid / "so-far.png").stat().st_size > 0


def test_budget_skips_and_lists_metric_sets(toy, tmp_path):
    model, tok, data, c0 = toy
    text = tmp_path / "heldout.txt"
    text.write_text("A short held-out text about rivers and towns. " * 20)
    cfg = _cfg(data, experiment="batch", batch_sizes=[4], baseline=False, eval={
        "batch_size": 8, "budget_s": 1e-9, "probes": ["perplexity"],
        "settings": {"perplexity": {"text": str(text), "tokens": 32, "window": 16}}})
    res = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "r", progress=False, second_moments=c0,
                         plot=False)
    (unit,) = _units(tmp_path / "r").values()
    assert unit["skipped"] == ["counterfact"]  # independent batches score no probes
    assert res["rows"][0].get("es") is None


def test_zsre_dataset_runs_through_the_runner(toy, tmp_path):
    model, tok, _, c0 = toy
    recs = [{"subject": s, "src": f"Which country is {s} in?", "answers": [a], "alt": a, "pred": "",
             "rephrase": f"In which country is {s}?", "loc": "nq question: who wrote the book", "loc_ans": "Smith"}
            for s, a in zip(SUBJECTS[:4], ["France", "Italy", "Japan", "Peru"])]
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(recs))
    cfg = _cfg(data, experiment="batch", batch_sizes=[2], dataset="zsre", value_store=str(tmp_path / "vs"))
    rows = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "r", progress=False,
                          second_moments=c0)["rows"]
    assert [r["method"] for r in rows] == ["none", "memit"]
    for r in rows:
        assert all(0.0 <= r[k] <= 100.0 for k in ("zsre_es", "zsre_ps", "zsre_ns"))
        assert "es" not in r
    assert rows[1]["kck_mean"] > 0 and rows[1]["kck_median"] > 0


def test_layer_sweep_chunks_merge_to_one_chunk(toy, tmp_path):
    """A layer's row from three chunks equals the row from one chunk of the same records: S and
    the bootstrap intervals from the pooled per-record scores, every other figure the
    record-weighted mean."""
    model, tok, data, c0 = toy
    rows = {}
    for cs in (1, 3):
        cfg = _cfg(data, experiment="layer-sweep", layers=[1], total_edits=3, chunk_size=cs, baseline=False)
        (rows[cs],) = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / f"c{cs}", progress=False,
                                     second_moments=c0, plot=False)["rows"]
    a, b = _metrics([rows[1]])[0], _metrics([rows[3]])[0]
    assert a.keys() == b.keys() and "score_lo" in a
    for r in rows.values():  # the chunks' mean Adam steps, weighted by their edits (for the cost model)
        assert 0 < r["value_steps_mean"] <= cfg.edit_hparams(cfg.methods[0]).steps
    for k, v in a.items():
        if isinstance(v, float):
            assert v == pytest.approx(b[k], abs=1e-9), k
        else:
            assert v == b[k], k


def test_shipped_configs_parse_and_plan():
    """Every config under configs/experiments is valid and plans units (a config that rots
    would only fail hours into someone's run, or on a GPU lent for minutes)."""
    from pathlib import Path

    paths = sorted((Path(__file__).parents[1] / "configs" / "experiments").glob("*.json"))
    assert len(paths) >= 12
    for p in paths:
        cfg = ExperimentConfig.from_file(p)
        assert plan(cfg), p.name
        for m in cfg.methods:
            cfg.edit_hparams(m)  # the preset and overrides combine for each method


def test_ge_on_a_fixed_subsample(toy, tmp_path):
    """eval.ge_data: GE of the same seeded sample of generation prompts at every unit (on the
    model the first update edits), equal to the entropy of the texts generate() samples; a file
    without generation prompts is refused before anything is edited."""
    from pmedit.data import select
    from pmedit.evaluation import generate
    from pmedit.evaluation.metrics import text_entropy
    from pmedit.evaluation.registry import load_dataset

    model, tok, data, c0 = toy
    ev = {"batch_size": 8, "ge_data": str(data), "ge_records": 3, "gen_length": 6}
    cfg = _cfg(data, experiment="batch", batch_sizes=[2], eval=ev)
    res = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "r", progress=False, second_moments=c0,
                         plot=False)
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["none", "memit"]
    for r in rows:
        assert r["ge_records"] == 3 and r["ge_lo"] <= r["ge"] <= r["ge_hi"]
    recs = select(load_dataset("counterfact", str(data)), 3, seed=cfg.seed)
    prompts = [p for r in recs for p in r.generation_prompts[:2]]
    conts = generate(model, tok, prompts, max_new_tokens=6, do_sample=True, top_k=5, seed=cfg.seed, force_length=True,
                     progress=False)
    want = 100.0 * sum(text_entropy(p + c) for p, c in zip(prompts, conts)) / len(prompts)  # one prompt per record
    assert rows[0]["ge"] == pytest.approx(want, rel=1e-12)

    reduced = tmp_path / "reduced.json"
    reduced.write_text(json.dumps([{"case_id": 1, "prompt": "Alpha Romeo is located in", "subject": "Alpha Romeo",
                                    "target_new": "Paris", "ground_truth": "Berlin"}]))
    bad = _cfg(data, experiment="batch", batch_sizes=[2], eval={**ev, "ge_data": str(reduced)})
    with pytest.raises(ValueError, match="holds no generation prompts"):
        run_experiment(bad, model=model, tokenizer=tok, out_dir=tmp_path / "r2", progress=False, second_moments=c0)
    assert not (tmp_path / "r2" / "results.json").exists()


def test_layer_sweep_perplexity_is_that_of_the_first_singular_edit(toy, tmp_path):
    """A layer-sweep row's perplexity is the model's with the first record edited alone (the first
    chunk measures it, later chunks do not): equal to editing that fact with the Editor, scoring
    the text and restoring."""
    from pmedit.data import select
    from pmedit.editor import Editor
    from pmedit.evaluation import load_heldout_text, perplexity

    model, tok, data, c0 = toy
    text = tmp_path / "heldout.txt"
    text.write_text("The city lies on a river. It has a bridge and a market. " * 20)
    ev = {"batch_size": 8, "perplexity": True, "ppl_text": str(text), "ppl_tokens": 64, "ppl_window": 32,
          "ge_data": str(data), "ge_records": 3, "gen_length": 6}
    cfg = _cfg(data, experiment="layer-sweep", layers=[1], total_edits=3, chunk_size=2, baseline=False, eval=ev)
    (row,) = run_experiment(cfg, model=model, tokenizer=tok, out_dir=tmp_path / "r", progress=False,
                            second_moments=c0, plot=False)["rows"]
    units = _units(tmp_path / "r")
    assert units["memit/L1/chunk0"]["ppl"] is not None and units["memit/L1/chunk1"].get("ppl") is None
    first_ge = units["memit/L1/chunk0"]["summary"]
    assert units["memit/L1/chunk1"]["summary"].get("ge") is None  # GE, like ppl, in the first chunk only
    for k in ("ge", "ge_lo", "ge_hi"):
        assert first_ge[k] is not None and row[k] == pytest.approx(first_ge[k], rel=1e-12), k
    texts = load_heldout_text(text, max_chars=64 * 8)
    before = perplexity(model, tok, texts, max_tokens=64, window=32)["ppl"]
    ed = Editor(model, tok, hparams=cfg.edit_hparams("memit").replace(layers=[1]), second_moments={1: c0[1]},
                progress=False)
    first = select(json.loads(data.read_text()), 3, seed=cfg.seed)[0]  # the runner's sample, in order
    ed.edit([first])
    want = perplexity(model, tok, texts, max_tokens=64, window=32)["ppl"]
    ed.restore()
    assert want != before  # the edit moves it, so equality below is not the unedited model's
    assert row["ppl"] == pytest.approx(want, rel=1e-5)  # weights W+uvᵀ written vs the Editor's write
