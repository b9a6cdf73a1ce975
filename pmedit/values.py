"""Values of edits: the output a decoder layer should produce at the subject for target_new to follow.

For each edit, z = h + δ where h is the output of decoder layer ``layer`` at the subject's last
token (bare prompt, unedited model) and δ is found by gradient descent, as in MEMIT's
``compute_z``: δ is added to that layer's output at the subject's last token of every rewriting
prompt (each context template filled with the prompt, and the bare prompt, each followed by
target_new's ids but the last) and of the KL prompt ``"{subject} is a"``, and minimises

    mean over prompts of the mean per-token NLL of target_new
    + kl_factor · KL(unedited ‖ edited) of the next-token distribution after the KL prompt
    + weight_decay · ‖δ‖² / ‖h‖²

with Adam, ‖δ‖ clamped to ``clamp_norm_factor``·‖h‖ after each step, and per-edit early stop
once the NLL is below ``loss_stop`` or (``stop_on_argmax``) target_new is the greedy
continuation under every rewriting prompt. ``mpes_steps`` = m > 0 is ENCORE's most-probable early
stopping with the authors' margin: an edit stops at the m-th evaluation at which target_new is the
greedy continuation under every rewriting prompt (their ``prob_cutoff = -m``; counted, not
necessarily consecutive, as they count; m = 1 is ``stop_on_argmax``). Their code checks the
template prompts but not the bare one (an index slip: the comment says it drops the KL prompt) and,
in ENCORE's copy, compares the hit count with 5 whatever the target's length; here every target
token under every rewriting prompt, the bare one included, must be the argmax.

This is where an edit's time goes, so it is batched: all rows of many edits go through one
forward/backward pass, each row adding its own edit's δ at its own position (right padding, so
positions count from the left); the per-edit losses are *summed*, so every row of δ gets the
gradient of its own edit's loss alone, and Adam (element-wise, implemented here with per-edit
step counts) then gives each edit the trajectory it would have had alone. An edit that has
stopped leaves the batch: its δ and Adam state are frozen and its rows are no longer computed.
Logits are computed only at the scored positions (the decoder body runs, the positions scored
are gathered, and only those rows go through the final norm and lm_head), never as a full
[rows, T, vocab] tensor. The unedited KL distribution and h are read in the first pass (δ = 0)
and kept. Model parameters are frozen during the optimisation and restored after.

Differences from MEMIT's code, on purpose: the KL is KL(unedited ‖ edited) of the distribution
*after* "{subject} is a" (MEMIT's F.kl_div call computes KL(edited ‖ unedited) at the subject
token); the weight decay is on ‖δ‖²/‖h‖² (MEMIT: ‖δ‖/‖h‖²); early stop looks at the NLL (MEMIT:
the total loss); target ids never contain BOS (pmedit.tokens). ``objective="memit"`` is theirs,
term by term (pmedit.value_objectives). ``engine="cached"`` (pmedit.values_cached) computes what δ
cannot change once per row, and ``dtype="bfloat16"`` runs the frozen model's per-step passes in
bf16: 9.8x less value time per edit at the smollm2 preset (interleaved), ES/PS within a point
(benchmarks/RESULTS.md).

Not here: keys (pmedit.keys) and turning (K, z − h) into a weight update (pmedit.editor).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from tqdm.auto import tqdm

from pmedit.hooks import Trace
from pmedit.keys import model_device
from pmedit.models import ModelSpec
from pmedit.requests import EditRequest, normalize_requests
from pmedit.tokens import EncodedEdit, EncodedPrompt, encode_kl_prompt, encode_rewrite, pad_batch, pad_id
from pmedit.value_objectives import Objective, get_objective

log = logging.getLogger(__name__)

ENGINES = ("full", "cached")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware. A CPU without AVX-512 BF16 or
    AMX runs bf16 matmuls through slow conversion paths (6-20x slower than fp32 on an AVX2
    EPYC, measured), so bf16 autocast there is a pessimisation, not a speed-up."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (Linux), read once per process: every value batch asks.
    Empty elsewhere: no cheap, reliable probe, and fp32 is never the slow choice."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_value_dtype(dtype: str, device: torch.device | str) -> str:
    """``"auto"``: bfloat16 where the device has native bf16 matmuls, float32 elsewhere; any
    other name as given (checked by optimize_values)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) else "float32"

KL_TEMPLATE = "{} is a"
_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as MEMIT uses
_EPS = 1e-8


@dataclass
class ValueResult:
    """Per-edit results, rows in request order (fp32, on the edited layer's device).

    ``z`` [E, hidden]: the target output of the layer (h + δ); ``h`` [E, hidden]: its unedited
    output; ``delta`` = z − h; ``losses`` [E]: NLL of target_new (mean over prompts of the
    per-token mean) at the final δ; ``kl`` [E]: the KL term at the final δ; ``steps`` [E]: Adam
    updates applied (0 when the target was already likely enough).
    """

    z: torch.Tensor
    h: torch.Tensor
    delta: torch.Tensor
    losses: torch.Tensor
    kl: torch.Tensor
    steps: torch.Tensor


@dataclass
class _Edit:
    rows: list[EncodedEdit]  # rewriting prompts: templates..., bare prompt last
    kl: EncodedPrompt


def _encode(tok, req: EditRequest, templates: Sequence[str], kl_template: str) -> _Edit:
    rows = [encode_rewrite(tok, req, t) for t in templates]
    rows.append(encode_rewrite(tok, req, None))
    return _Edit(rows, encode_kl_prompt(tok, req.subject, kl_template))


def _decoder_body(model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, bool]:
    """(the module that runs embeddings + layers, whether it also applies the final norm)."""
    body_path = spec.layers_path.rpartition(".")[0]
    body = model.get_submodule(body_path) if body_path else model
    if body is model:
        raise ValueError(f"{type(model).__name__}: decoder layers at {spec.layers_path!r} have no enclosing body module")
    applies_norm = spec.norm_path.startswith(body_path + ".")
    return body, applies_norm


def optimize_values(
    model: nn.Module,
    tok,
    spec: ModelSpec,
    layer: int,
    requests: Sequence[EditRequest | dict],
    templates: Sequence[str],
    *,
    lr: float = 0.5,
    steps: int = 25,
    kl_factor: float = 0.0625,
    weight_decay: float = 1e-3,
    clamp_norm_factor: float = 4.0,
    loss_stop: float = 5e-2,
    stop_on_argmax: bool = False,
    batch_size: int = 16,
    mpes_steps: int = 0,
    kl_template: str = KL_TEMPLATE,
    progress: bool = False,
    objective: str = "pmedit",
    engine: str = "full",
    dtype: str = "float32",
) -> ValueResult:
    """Optimise δ for every request, ``batch_size`` edits per forward/backward pass.

    ``steps`` is the most Adam updates an edit gets (the loss is evaluated once more after the
    last); memory grows with ``batch_size`` × (len(templates) + 2) sequences.
    ``objective``: "pmedit" (above) or "memit", the MEMIT/EMMET authors' ``compute_z`` objective
    (pmedit.value_objectives, term by term). ``engine``: "full" runs every row through the whole
    model each step; "cached" computes the layers up to ``layer`` and the positions before the
    subject once per row and each step only the rest (pmedit.values_cached; same function of δ up
    to fp32 summation order). ``dtype``: "bfloat16" runs the frozen model's per-step passes under
    autocast (δ, Adam, final norm, logits and losses stay fp32); "auto" does so only where the
    device multiplies bf16 natively (:func:`native_bf16`).
    """
    reqs = normalize_requests(requests)
    _check_args(lr=lr, steps=steps, kl_factor=kl_factor, weight_decay=weight_decay,
                clamp_norm_factor=clamp_norm_factor, loss_stop=loss_stop, batch_size=batch_size)
    if isinstance(mpes_steps, bool) or not isinstance(mpes_steps, int) or mpes_steps < 0:
        raise ValueError(f"optimize_values: mpes_steps must be an int >= 0, got {mpes_steps!r}")
    obj = get_objective(objective)
    if engine not in ENGINES:
        raise ValueError(f"optimize_values: engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    out_device = spec.down_proj(model, layer).weight.device
    dtype = resolve_value_dtype(dtype, out_device)
    if dtype not in DTYPES:
        raise ValueError(f"optimize_values: dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
    hidden = spec.hidden_size
    E = len(reqs)
    result = ValueResult(
        z=torch.zeros((E, hidden), device=out_device),
        h=torch.zeros((E, hidden), device=out_device),
        delta=torch.zeros((E, hidden), device=out_device),
        losses=torch.zeros(E, device=out_device),
        kl=torch.zeros(E, device=out_device),
        steps=torch.zeros(E, dtype=torch.long, device=out_device),
    )
    if E == 0:
        return result
    encoded = [_encode(tok, r, templates, kl_template) for r in reqs]
    for i, e in enumerate(encoded):
        for row in e.rows:
            if row.subject_last >= row.first_scored + 1 or row.subject_last < 0:
                raise ValueError(f"request {i} (case_id={reqs[i].case_id!r}): subject's last token "
                                 f"{row.subject_last} is not inside the prompt")
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        bar = tqdm(total=E, desc=f"values L{layer}", unit="edit", disable=not progress, leave=False)
        for s in range(0, E, batch_size):
            idx = list(range(s, min(E, s + batch_size)))
            chunk = _optimize_chunk(
                model, tok, spec, layer, [encoded[i] for i in idx],
                lr=lr, steps=steps, kl_factor=kl_factor, weight_decay=weight_decay,
                clamp_norm_factor=clamp_norm_factor, loss_stop=loss_stop, stop_on_argmax=stop_on_argmax,
                mpes_steps=mpes_steps, objective=obj, engine=engine, dtype=DTYPES[dtype],
            )
            for name in ("h", "delta", "losses", "kl", "steps"):
                getattr(result, name)[s : s + len(idx)] = getattr(chunk, name).to(out_device)
            bar.update(len(idx))
        bar.close()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    result.z = result.h + result.delta
    log.debug("values L%d: %d edits, steps %s, final NLL %s", layer, E, result.steps.tolist(), result.losses.tolist())
    return result


def _check_args(**kw) -> None:
    for name in ("lr", "clamp_norm_factor"):
        if not kw[name] > 0:
            raise ValueError(f"optimize_values: {name} must be > 0, got {kw[name]!r}")
    for name in ("kl_factor", "weight_decay", "loss_stop"):
        if not kw[name] >= 0:
            raise ValueError(f"optimize_values: {name} must be >= 0, got {kw[name]!r}")
    if not isinstance(kw["steps"], int) or kw["steps"] < 0:
        raise ValueError(f"optimize_values: steps must be an int >= 0, got {kw['steps']!r}")
    if not isinstance(kw["batch_size"], int) or kw["batch_size"] < 1:
        raise ValueError(f"optimize_values: batch_size must be an int >= 1, got {kw['batch_size']!r}")


# Per-pass overhead expressed in tokens, for grouping rows by length: on a CPU a pass costs
# little beyond its tokens, on a GPU a pass of a few hundred tokens is launch-bound.
_PASS_OVERHEAD_TOKENS = {"cpu": 16, "cuda": 4096}


def _group_by_length(lengths: list[int], overhead: int) -> list[list[int]]:
    """Row indices in groups that minimise padded tokens + ``overhead`` per group.

    Rows of an edit differ a lot in length (template rows ~20 tokens, "{subject} is a" ~5), so one
    padded batch wastes up to half its compute on padding. Sorted by length, the best contiguous
    split is a small dynamic programme over the distinct lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    distinct = sorted(set(lengths), reverse=True)
    counts = [sum(1 for x in lengths if x == L) for L in distinct]
    n = len(distinct)
    best = [0.0] + [float("inf")] * n  # best[k]: cost of the k longest distinct lengths
    cut = [0] * (n + 1)
    for k in range(1, n + 1):
        rows = 0
        for j in range(k, 0, -1):  # group = distinct[j-1 .. k-1], padded to distinct[j-1]
            rows += counts[j - 1]
            c = best[j - 1] + rows * distinct[j - 1] + overhead
            if c < best[k]:
                best[k], cut[k] = c, j - 1
    bounds, k = [], n
    while k > 0:
        bounds.append((cut[k], k))
        k = cut[k]
    groups, pos = [], 0
    for lo, hi in reversed(bounds):
        size = sum(counts[lo:hi])
        groups.append(order[pos:pos + size])
        pos += size
    return groups


class _Group:
    """Index tensors of one forward pass over some rows of the active edits (``j`` indexes the
    active edits, ``ri`` the rows of this pass)."""

    def __init__(self, rows: list[tuple], pad: int, device: torch.device, kl_at_subject: bool = False):
        seqs, row_edit, row_pos = [], [], []
        tok_row, tok_pos, tok_target, tok_edit, tok_weight = [], [], [], [], []
        kl_row, kl_pos, kl_edit, bare_row, bare_edit = [], [], [], [], []
        for ri, (j, kind, enc, weight) in enumerate(rows):
            seqs.append(enc.ids)
            row_edit.append(j)
            row_pos.append(enc.subject_last)
            if kind == "kl":
                kl_row.append(ri)
                kl_pos.append(enc.subject_last if kl_at_subject else len(enc.ids) - 1)
                kl_edit.append(j)
                continue
            if kind == "bare":
                bare_row.append(ri)
                bare_edit.append(j)
            for t, target in enumerate(enc.target_ids):
                tok_row.append(ri)
                tok_pos.append(enc.first_scored + t)
                tok_target.append(target)
                tok_edit.append(j)
                tok_weight.append(weight)
        self.ids, mask = pad_batch(seqs, pad, device)
        # No padding: let attention take its plain causal path.
        self.mask = None if bool(mask.all()) else mask
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        self.all_rows = torch.arange(len(seqs), device=device)
        self.row_edit, self.row_pos = as_long(row_edit), as_long(row_pos)
        self.tok_row, self.tok_pos, self.tok_target = as_long(tok_row), as_long(tok_pos), as_long(tok_target)
        self.tok_edit, self.tok_weight = as_long(tok_edit), torch.tensor(tok_weight, device=device)
        self.kl_row, self.kl_pos, self.kl_edit = as_long(kl_row), as_long(kl_pos), as_long(kl_edit)
        self.bare_row, self.bare_edit = as_long(bare_row), as_long(bare_edit)


def _make_rows(edits: list[_Edit], active: list[int]) -> list[tuple]:
    rows = []  # (active index j, kind, encoding, weight of each of its target tokens)
    for j, e in enumerate(active):
        ed = edits[e]
        n_prompts = len(ed.rows)
        for r, row in enumerate(ed.rows):
            # mean over this prompt's tokens, then mean over the edit's prompts
            rows.append((j, "bare" if r == n_prompts - 1 else "ctx", row, 1.0 / (len(row.target_ids) * n_prompts)))
        rows.append((j, "kl", ed.kl, 0.0))
    return rows


def _make_groups(edits: list[_Edit], active: list[int], pad: int, device: torch.device,
                 kl_at_subject: bool = False) -> list[_Group]:
    rows = _make_rows(edits, active)
    overhead = _PASS_OVERHEAD_TOKENS.get(torch.device(device).type, 1024)
    groups = _group_by_length([len(r[2].ids) for r in rows], overhead)
    return [_Group([rows[i] for i in g], pad, device, kl_at_subject) for g in groups]


def _optimize_chunk(model, tok, spec, layer, edits: list[_Edit], *, lr, steps, kl_factor, weight_decay,
                    clamp_norm_factor, loss_stop, stop_on_argmax, mpes_steps=0, objective: Objective | None = None,
                    engine: str = "full", dtype: torch.dtype = torch.float32) -> ValueResult:
    obj = objective or get_objective("pmedit")
    n_upd = obj.updates(steps)
    device = model_device(model)
    body, body_norms = _decoder_body(model, spec)
    norm = None if body_norms else spec.norm(model)
    lm_head = spec.lm_head(model)
    layer_name = spec.layer_name(layer)
    n, hidden = len(edits), spec.hidden_size
    pad = pad_id(tok)

    delta = torch.zeros((n, hidden), dtype=torch.float32, device=device)
    m = torch.zeros_like(delta)  # Adam moments and per-edit step counts (an edit's trajectory
    v = torch.zeros_like(delta)  # must not depend on its batch-mates, so the state is per row)
    t_adam = torch.zeros(n, dtype=torch.long, device=device)
    h = torch.zeros((n, hidden), dtype=torch.float32, device=device)
    h_sq = torch.ones(n, dtype=torch.float32, device=device)
    ref_logp = None  # [n, vocab] unedited next-token log-probs after the KL prompt
    final_nll = torch.zeros(n, device=device)
    final_kl = torch.zeros(n, device=device)
    top_hits = torch.zeros(n, dtype=torch.long, device=device)  # mpes_steps: evaluations at argmax
    check_argmax = stop_on_argmax or mpes_steps > 0
    active = list(range(n))
    groups = None
    cached = None  # engine "cached": the chunk's rows, prepared once; each step uses a view of them
    if engine == "cached":
        from pmedit.values_cached import make_cached_groups

        final_norm = spec.norm(model)
        cached = make_cached_groups(model, body, spec, layer, _make_rows(edits, active), pad, device,
                                    kl_at_subject=obj.kl_at_subject,
                                    overhead=_PASS_OVERHEAD_TOKENS.get(torch.device(device).type, 1024),
                                    dtype=dtype)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32 else None
    for it in range(n_upd + 1):
        if groups is None and cached is not None:
            groups = [v for v in (c.view(active) for c in cached) if not v.empty]
        elif groups is None:
            groups = _make_groups(edits, active, pad, device, obj.kl_at_subject)
        act = torch.tensor(active, dtype=torch.long, device=device)
        n_act = len(active)
        d_param = delta[act].clone().requires_grad_(True)
        nll = torch.zeros(n_act, device=device)
        kl = torch.zeros(n_act, device=device)
        misses = torch.zeros(n_act, dtype=torch.long, device=device)
        # The pass after the last update only reports the loss: no graph needed.
        with torch.set_grad_enabled(it < n_upd):
            for g in groups:
                if cached is not None:
                    if it == 0:  # the once-per-row pass read the unedited output at the subject
                        h[act[g.bare_edit]] = g.base[g.bare_row, 0].detach().float()
                    sel = final_norm(g.selected_hidden(d_param, dtype))
                    logits = lm_head(sel.to(lm_head.weight.device)).float().to(device)
                else:
                    def add_delta(name, out, g=g):
                        # .to(out.device): with a device_map the layer may live on another device.
                        rows, pos = g.all_rows.to(out.device), g.row_pos.to(out.device)
                        if it == 0:  # δ = 0 here: the unedited output at the bare prompt's subject
                            b = g.bare_row.to(out.device)
                            h[act[g.bare_edit]] = out[b, pos[b]].detach().float().to(device)
                        add = d_param[g.row_edit].to(device=out.device, dtype=out.dtype)
                        return out.index_put((rows, pos), add, accumulate=True)

                    with Trace(model, layer_name, edit_output=add_delta), (autocast or contextlib.nullcontext()):
                        hs = body(input_ids=g.ids, attention_mask=g.mask, use_cache=False).last_hidden_state
                    # Only the scored positions reach the vocabulary projection.
                    r = torch.cat([g.tok_row, g.kl_row]).to(hs.device)
                    q = torch.cat([g.tok_pos, g.kl_pos]).to(hs.device)
                    # fp32 under autocast (the head then runs in fp32); the model's own dtype otherwise
                    sel = hs[r, q].float() if autocast is not None else hs[r, q]
                    if norm is not None:
                        sel = norm(sel)
                    logits = lm_head(sel.to(lm_head.weight.device)).float().to(device)
                n_tok = g.tok_row.numel()
                if n_tok:
                    # logsumexp − target logit: the NLL without a second [tokens, vocab] tensor
                    tl = logits[:n_tok]
                    nll_tok = torch.logsumexp(tl, dim=-1) - tl.gather(1, g.tok_target[:, None]).squeeze(1)
                    nll = nll.index_add(0, g.tok_edit, nll_tok * g.tok_weight)
                    if check_argmax:
                        hit = (logits[:n_tok].argmax(1) == g.tok_target).long()
                        misses.index_add_(0, g.tok_edit, 1 - hit)
                if g.kl_row.numel():
                    kl_logp = torch.log_softmax(logits[n_tok:], dim=-1)
                    if it == 0:
                        if ref_logp is None:
                            ref_logp = torch.zeros((n, kl_logp.shape[1]), device=device)
                        ref_logp[act[g.kl_edit]] = kl_logp.detach()
                    ref = ref_logp[act[g.kl_edit]]
                    kl = kl.index_add(0, g.kl_edit, obj.kl(ref, kl_logp))
            if it == 0:
                h_sq[act] = h[act].pow(2).sum(1).clamp_min(1e-12)
            wd = obj.decay(d_param, h_sq[act])
            loss = nll + kl_factor * kl + weight_decay * wd
            nll_d = nll.detach()
            done = obj.stop_value(nll_d, loss) < loss_stop
            if stop_on_argmax:
                done |= misses == 0
            if mpes_steps:
                top_hits[act] += (misses == 0).long()
                done |= top_hits[act] >= mpes_steps
            if it == n_upd:
                done[:] = True
            final_nll[act] = nll_d
            final_kl[act] = kl.detach()
            keep = ~done
            if not bool(keep.any()):
                break
            # Summed per-edit losses: row j of the gradient is d loss_j / d delta_j alone.
            (loss * keep).sum().backward()
        grad = d_param.grad.detach()
        _adam_rows(delta, m, v, t_adam, grad, act, keep, lr)
        # Clamp each continuing edit's ‖δ‖ to clamp_norm_factor·‖h‖.
        upd = act[keep]
        max_norm = clamp_norm_factor * h_sq[upd].sqrt()
        norms = delta[upd].norm(dim=1)
        scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))
        delta[upd] = delta[upd] * scale[:, None]
        if not bool(keep.all()):
            active = [e for e, k in zip(active, keep.tolist()) if k]
            groups = None  # stopped edits leave the batch
    return ValueResult(z=h + delta, h=h, delta=delta, losses=final_nll, kl=final_kl, steps=t_adam)


def _adam_rows(delta, m, v, t, grad, act, keep, lr) -> None:
    """torch.optim.Adam's update (same formula and order of operations) on the kept rows only."""
    rows = act[keep]
    g = grad[keep]
    b1, b2 = _BETAS
    t[rows] += 1
    step = t[rows].to(delta.dtype)[:, None]
    m_r = m[rows].mul_(b1).add_(g, alpha=1 - b1)
    v_r = v[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
    m[rows], v[rows] = m_r, v_r
    bias1 = 1 - b1 ** step
    bias2_sqrt = (1 - b2 ** step).sqrt()
    denom = (v_r.sqrt() / bias2_sqrt).add_(_EPS)
    delta[rows] = delta[rows] - (lr / bias1) * m_r / denom
