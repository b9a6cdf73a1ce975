"""Keys (pmedit.keys) and batched value optimisation (pmedit.values) on SmolLM2, against plain
torch references: one prompt at a time with full logits and torch.optim.Adam.

Kept small (a template or two, a few steps) so the file runs in about a minute on 2 loaded
cores. Every test leaves the shared model as it found it (checked by a fixture).
"""
from __future__ import annotations

import pytest
import torch

from pmedit.keys import context_templates, compute_keys
from pmedit.models import ModelSpec
from pmedit.requests import EditRequest
from pmedit.tokens import encode_kl_prompt, encode_rewrite, encode_subject_prompt, fill_template
from pmedit.values import optimize_values

LAYER = 3
REQS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=0),
    EditRequest("{} was born in", "Alan Turing", "São Paulo", case_id=1),
    EditRequest("The capital of {} is", "France", "Paris", case_id=2),  # already the model's answer
]
# Fixed templates so the value tests do not depend on sampling (context_templates is tested alone).
TEMPLATES = ["I like {{braces}}. {}"]


@pytest.fixture(scope="module")
def model_tok_spec(smollm2, one_intraop_thread):
    model, tok = smollm2
    return model, tok, ModelSpec.from_model(model)


@pytest.fixture(autouse=True)
def _model_untouched(smollm2):
    """Weights bit-identical, requires_grad flags and hooks as before, eval mode."""
    model, _ = smollm2
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "layers.3." in k or "norm" in k}
    flags = [p.requires_grad for p in model.parameters()]
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    yield
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks
    assert not model.training


# ----------------------------------------------------------------------------------------
# context templates


def test_context_templates_deterministic_and_well_formed(model_tok_spec):
    model, tok, _ = model_tok_spec
    a = context_templates(model, tok, n=3, length=4, seed=0, starters=("The", "Because"))
    b = context_templates(model, tok, n=3, length=4, seed=0, starters=("The", "Because"))
    c = context_templates(model, tok, n=3, length=4, seed=1, starters=("The", "Because"))
    assert a == b and a != c
    assert len(a) == 3
    assert a[0].startswith("The") and a[1].startswith("Because") and a[2].startswith("The")  # starters cycle
    for t in a:
        assert t.endswith(". {}")
        filled, off = fill_template(t, "X")  # braces in sampled text are escaped: exactly one field
        assert filled[off:] == "X"
        n_tokens = len(tok(filled[: off - 2], add_special_tokens=False)["input_ids"])
        assert n_tokens <= 4 + 1  # ~length tokens (decode/re-encode may split one token)
    assert context_templates(model, tok, n=0) == []
    with pytest.raises(ValueError, match="length"):
        context_templates(model, tok, n=2, length=0)


# ----------------------------------------------------------------------------------------
# keys


def _reference_key(model, tok, spec, layer, req, templates):
    """One prompt per forward pass, full model, a hook on down_proj: ½ bare + ½ mean(templates)."""
    got = []
    mod = spec.down_proj(model, layer)
    handle = mod.register_forward_hook(lambda m, args, out: got.append(args[0].detach()))
    try:
        ks = []
        for t in [None, *templates]:
            p = encode_subject_prompt(tok, req, t)
            got.clear()
            with torch.no_grad():
                model(input_ids=torch.tensor([p.ids]))
            ks.append(got[0][0, p.subject_last].double())
    finally:
        handle.remove()
    if not templates:
        return ks[0]
    return 0.5 * ks[0] + 0.5 * torch.stack(ks[1:]).mean(0)


def test_compute_keys_matches_reference(model_tok_spec):
    model, tok, spec = model_tok_spec
    templates = ["A short one. {}", "Something a little longer than that, {{x}}. {}"]
    K = compute_keys(model, tok, spec, LAYER, REQS[:2], templates, batch_size=64)
    assert K.shape == (2, spec.intermediate_size) and K.dtype == torch.float32
    ref = torch.stack([_reference_key(model, tok, spec, LAYER, r, templates) for r in REQS[:2]])
    # fp32 activations; batching with padding only changes summation order (~1e-6 relative).
    torch.testing.assert_close(K.double(), ref, rtol=1e-4, atol=1e-5)
    K1 = compute_keys(model, tok, spec, LAYER, [r.to_dict() for r in REQS[:2]], templates, batch_size=1)
    torch.testing.assert_close(K1, K, rtol=1e-4, atol=1e-5)
    bare = compute_keys(model, tok, spec, LAYER, REQS[:1], [], batch_size=8)
    torch.testing.assert_close(bare[0].double(), _reference_key(model, tok, spec, LAYER, REQS[0], []),
                               rtol=1e-4, atol=1e-5)
    assert compute_keys(model, tok, spec, LAYER, [], templates).shape == (0, spec.intermediate_size)


# ----------------------------------------------------------------------------------------
# values


def _reference_values(model, tok, spec, layer, req, templates, *, lr, steps, kl_factor, weight_decay,
                      clamp_norm_factor, loss_stop):
    """MEMIT's compute_z loop for one edit, written plainly: a hook adds δ, full logits, torch Adam."""
    rows = [encode_rewrite(tok, req, t) for t in [*templates, None]]
    kl = encode_kl_prompt(tok, req.subject)
    seqs = [r.ids for r in rows] + [kl.ids]
    pos = [r.subject_last for r in rows] + [kl.subject_last]
    delta = torch.zeros(spec.hidden_size, requires_grad=True)
    state = {}

    def hook(mod, args, out):
        hs = out[0] if isinstance(out, tuple) else out
        state.setdefault("h", hs[len(rows) - 1, pos[len(rows) - 1]].detach().clone())
        hs = hs.clone()
        for i, p in enumerate(pos):
            hs[i, p] = hs[i, p] + delta
        return (hs, *out[1:]) if isinstance(out, tuple) else hs

    n = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    opt = torch.optim.Adam([delta], lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handle = spec.layer(model, layer).register_forward_hook(hook)
    try:
        ref_kl, nll = None, None
        for it in range(steps + 1):
            opt.zero_grad()
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            nlls = []
            for i, r in enumerate(rows):
                lp = logp[i, r.first_scored: r.first_scored + len(r.target_ids)]
                nlls.append(-lp.gather(1, torch.tensor(r.target_ids)[:, None]).mean())
            nll = torch.stack(nlls).mean()
            kl_lp = logp[len(rows), len(kl.ids) - 1]
            if ref_kl is None:
                ref_kl = kl_lp.detach()
            kl_term = (ref_kl.exp() * (ref_kl - kl_lp)).sum()
            loss = nll + kl_factor * kl_term + weight_decay * delta.pow(2).sum() / state["h"].pow(2).sum()
            if nll.item() < loss_stop or it == steps:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = clamp_norm_factor * state["h"].norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
        return delta.detach(), state["h"], nll.item(), it
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


@pytest.mark.parametrize("clamp", [4.0, 0.1])  # 0.1: the norm clamp is active from the first step
def test_values_match_plain_reference(model_tok_spec, clamp):
    model, tok, spec = model_tok_spec
    kw = dict(lr=0.5, steps=2, kl_factor=0.0625, weight_decay=1e-3, clamp_norm_factor=clamp, loss_stop=5e-2)
    d_ref, h_ref, nll_ref, n_steps = _reference_values(model, tok, spec, LAYER, REQS[1], TEMPLATES, **kw)
    res = optimize_values(model, tok, spec, LAYER, [REQS[1]], TEMPLATES, batch_size=4, **kw)
    # h is read from the same fp32 forward pass: equal up to summation order.
    torch.testing.assert_close(res.h[0], h_ref, rtol=1e-5, atol=1e-4)
    # δ after Adam steps: |Δδ|/|δ| at fp32-rounding level of gradients, amplified little by Adam.
    assert (res.delta[0] - d_ref).norm() <= 1e-4 * d_ref.norm() + 1e-5, (res.delta[0] - d_ref).norm()
    torch.testing.assert_close(res.z, res.h + res.delta)
    assert int(res.steps[0]) == n_steps
    assert abs(float(res.losses[0]) - nll_ref) <= 1e-4 * max(1.0, nll_ref)
    if clamp == 0.1:
        torch.testing.assert_close(res.delta[0].norm(), clamp * res.h[0].norm(), rtol=1e-5, atol=0)


def test_batched_equals_one_at_a_time_and_stopped_edits_freeze(model_tok_spec):
    """The issue's acceptance test: batched δ = one edit at a time (1e-4). The France edit already
    has its target as greedy continuation, so with stop_on_argmax it stops at step 0 and must
    stay frozen (δ = 0) while the others keep optimising in the same batch."""
    model, tok, spec = model_tok_spec
    kw = dict(lr=0.5, steps=3, loss_stop=5e-2, stop_on_argmax=True)
    batched = optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, batch_size=8, **kw)
    singles = [optimize_values(model, tok, spec, LAYER, [r], TEMPLATES, batch_size=1, **kw) for r in REQS]
    d1 = torch.cat([s.delta for s in singles])
    scale = d1.norm(dim=1, keepdim=True).clamp_min(1.0)
    # Relative 1e-4: fp32 rounding differs between batch shapes (padding, GEMM blocking).
    assert ((batched.delta - d1).abs() / scale).max() <= 1e-4
    assert batched.steps.tolist() == [int(s.steps[0]) for s in singles]
    torch.testing.assert_close(batched.losses, torch.cat([s.losses for s in singles]), rtol=1e-4, atol=1e-5)
    assert batched.steps[2] == 0 and torch.all(batched.delta[2] == 0)  # France → Paris: nothing to do
    assert batched.steps[0] > 0 and batched.steps[1] > 0
    # Chunks of 2 edits give the same answer as one chunk.
    chunked = optimize_values(model, tok, spec, LAYER, REQS, TEMPLATES, batch_size=2, **kw)
    assert ((chunked.delta - d1).abs() / scale).max() <= 1e-4
    # The optimisation moves the target: NLL drops for the edits that ran.
    first = optimize_values(model, tok, spec, LAYER, REQS[:2], TEMPLATES, steps=0)
    assert torch.all(first.delta == 0) and torch.all(first.steps == 0)
    assert torch.all(batched.losses[:2] < first.losses)


def test_values_bad_arguments(model_tok_spec):
    model, tok, spec = model_tok_spec
    for kw, word in [({"steps": -1}, "steps"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size"),
                     ({"kl_factor": -1.0}, "kl_factor"), ({"clamp_norm_factor": 0.0}, "clamp_norm_factor")]:
        with pytest.raises(ValueError, match=word):
            optimize_values(model, tok, spec, LAYER, REQS[:1], TEMPLATES, **kw)
    with pytest.raises(ValueError, match=r"request 0 \(case_id=None\): field 'subject'"):
        optimize_values(model, tok, spec, LAYER, [{"prompt": "{} is", "subject": "", "target_new": "x"}], TEMPLATES)
    with pytest.raises(ValueError, match="layer index 99"):
        optimize_values(model, tok, spec, 99, REQS[:1], TEMPLATES)
    res = optimize_values(model, tok, spec, LAYER, [], TEMPLATES)
    assert res.z.shape == (0, spec.hidden_size)


def _padded_cost(lengths, groups, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("overhead", [0, 16, 4096])
def test_group_by_length_is_optimal_partition(seed, overhead):
    """The grouping used to cut padding: every row exactly once, and no contiguous split of the
    sorted lengths (brute force over all 2^(k-1) splits of k distinct lengths) is cheaper."""
    import itertools
    import random

    from pmedit.values import _group_by_length

    rng = random.Random(seed)
    lengths = [rng.choice([3, 5, 9, 12, 20, 21, 30]) for _ in range(rng.randint(1, 12))]
    groups = _group_by_length(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    distinct = sorted(set(lengths), reverse=True)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
        parts, cur = [], [distinct[0]]
        for L, c in zip(distinct[1:], cuts):
            if c:
                parts.append(cur)
                cur = []
            cur.append(L)
        parts.append(cur)
        cost = sum(sum(lengths.count(L) for L in p) * p[0] + overhead for p in parts)
        best = min(best, cost)
    assert _padded_cost(lengths, groups, overhead) == best
