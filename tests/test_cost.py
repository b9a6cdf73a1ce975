"""pmedit.experiments.cost: token counts equal a direct count over the sampled records, units
are counted as the runner plans them, and the FLOP model's parameter counts are a real
model's."""
from __future__ import annotations

import json

import pytest

from conftest import make_tiny_llama
from pmedit.experiments import ExperimentConfig
from pmedit.experiments.cost import H100_SXM, LLAMA3_8B, Shape, calibrate, count_work, flops, seconds_on

SUBJECTS = ["Alpha Romeo", "Bravo Town", "Charlie Hill", "Delta Lake"]
TEMPLATES = ["Once upon a time. {}", "{}"]


@pytest.fixture()
def data(tmp_path):
    recs = [{"case_id": i, "requested_rewrite": {"prompt": "{} is located in", "subject": s,
                                                 "target_new": {"str": "Paris"}, "target_true": {"str": "Lima"}},
             "paraphrase_prompts": [f"People say {s} is in"], "neighborhood_prompts": ["The river is in"],
             "generation_prompts": [f"{s} is"]} for i, s in enumerate(SUBJECTS)]
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(recs))
    return p


def _cfg(data, **kw):
    base = dict(data=str(data), layers=[1], methods=["memit", "emmet"], total_edits=4, preset=None,
                hparams={"steps": 3}, eval={"perplexity": True, "ppl_tokens": 64, "ge_data": str(data), "ge_records": 2})
    base.update(kw)
    return ExperimentConfig.from_dict(base)


def _direct_tokens(tok, data):
    from pmedit.evaluation.registry import load_dataset
    from pmedit.evaluation.scoring import encode_pair
    from pmedit.tokens import encode_kl_prompt, encode_rewrite
    from pmedit.values import KL_TEMPLATE

    recs = load_dataset("counterfact", str(data))
    rows, score = [], []
    for r in recs:
        q = r.as_memit_dict()
        from pmedit.requests import normalize_requests

        (req,) = normalize_requests([q])
        rows.append(sum(len(encode_rewrite(tok, req, t).ids) for t in TEMPLATES[:1] + [None])
                    + len(encode_kl_prompt(tok, req.subject, KL_TEMPLATE).ids))
        s = 0
        for prompt, other in ((r.rewrite_prompt, r.target_true), (r.paraphrase_prompts[0], r.target_true),
                              (r.neighborhood_prompts[0], r.neighborhood_target)):
            for tgt in (r.target_new, other):
                p, t = encode_pair(tok, prompt, tgt)
                s += len(p) + len(t)
        score.append(s)
    return rows, score


def test_batch_counts(smollm2, data):
    _, tok = smollm2
    cfg = _cfg(data, experiment="batch", batch_sizes=[2, 4])
    w = count_work(cfg, tok, TEMPLATES[:1])
    rows, score = _direct_tokens(tok, data)
    assert w.value_optimisations == 4  # once, shared by both methods and both batch sizes
    assert w.value_row_tokens == sum(rows)
    assert w.scored_records == 4 + 2 * 2 * 4  # baseline + every record at every (method, B)
    assert w.score_tokens == sum(score) * 5
    assert w.ppl_tokens == 64 * 5 and w.ge_passes == 5 and w.ge_prompts == 2 * 2
    assert w.groups == [(2, 2), (4, 1), (2, 2), (4, 1)]
    assert w.value_steps == 4.0


def test_sequential_counts(smollm2, data):
    _, tok = smollm2
    cfg = _cfg(data, experiment="sequential-batch", batch_sizes=[2], eval_points=[2])
    w = count_work(cfg, tok, TEMPLATES[:1])
    rows, _ = _direct_tokens(tok, data)
    # first batch on unedited weights (shared by the methods), the second on each method's own
    assert w.value_optimisations == 2 + 2 * 2
    assert w.value_row_tokens == rows[0] + rows[1] + 2 * (rows[2] + rows[3])
    assert w.scored_records == 4 + 2 * (2 + 4)


def test_layer_sweep_counts_values_at_every_layer(smollm2, data):
    """A layer sweep optimises each record's value once per layer (shared by the methods); its
    value FLOPs are the sum of each layer's, through the token-weighted mean layer."""
    _, tok = smollm2
    cfg = _cfg(data, experiment="layer-sweep", layers=[1, 5], methods=["rome", "emmet"], chunk_size=2, baseline=False)
    w = count_work(cfg, tok, TEMPLATES[:1])
    rows, _ = _direct_tokens(tok, data)
    assert w.value_optimisations == 2 * 4 and w.value_row_tokens == 2 * sum(rows)
    assert w.layer_of_edits == pytest.approx(3.0)
    one = {layer: flops(w, LLAMA3_8B, layer=layer)["values"] for layer in (1, 5)}
    assert flops(w, LLAMA3_8B)["values"] == pytest.approx((one[1] + one[5]) / 2, rel=1e-12)


def test_shape_counts_parameters_and_flops():
    m = make_tiny_llama(hidden=64, intermediate=96, layers=3, vocab=128)
    s = Shape.from_hf_config(m.config)
    layer = m.model.layers[0]
    linear = sum(p.numel() for n, p in layer.named_parameters() if "norm" not in n)
    assert s.layer_params == linear and s.head_params == m.lm_head.weight.numel()
    assert LLAMA3_8B.layers * LLAMA3_8B.layer_params + 2 * LLAMA3_8B.head_params == pytest.approx(8.03e9, rel=0.01)


def test_flops_seconds_and_calibration(smollm2, data):
    _, tok = smollm2
    w = count_work(_cfg(data, experiment="batch", batch_sizes=[4]), tok, TEMPLATES[:1])
    f = flops(w, LLAMA3_8B)
    full = 2 * (LLAMA3_8B.layers * LLAMA3_8B.layer_params + LLAMA3_8B.head_params)
    assert f["scoring"] == full * w.score_tokens
    assert flops(w, LLAMA3_8B, layer=31)["values"] < f["values"]  # nothing above the last layer to backpropagate
    sec = seconds_on(w, LLAMA3_8B, H100_SXM)
    assert sec["total"] == pytest.approx(sum(v for k, v in sec.items() if k != "total"))
    rows = [{"seconds_values": 2.0, "seconds_keys": 0.5, "eval_seconds": 4.0, "value_steps_mean": 2.0}]
    cal = calibrate(w, LLAMA3_8B, rows)
    assert cal["value_seconds"] == 2.5 and cal["eval_seconds"] == 4.0 and cal["value_steps_measured"] == 2.0
    assert cal["value_gflops_s"] == pytest.approx(flops(w, LLAMA3_8B, value_steps=3.0)["values"] / 2.5 / 1e9)
