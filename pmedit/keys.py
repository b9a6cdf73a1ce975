"""Keys of edits: what the edited ``down_proj`` sees when the model reads the subject.

MEMIT's key for an edit is the input of ``layers[l].mlp.down_proj`` at the subject's last
token, averaged over contexts so that the edit fires wherever the subject is mentioned, not
only after the exact prompt: half the weight on the bare prompt, half on the mean over a few
short random prefixes. The prefixes (:func:`context_templates`) are sampled once from the
unedited model with a fixed seed, so every batch of a sequential run, and a re-run, uses the
same contexts; they are format strings ending in ``". {}"``.

:func:`compute_keys` packs the rows of all requests (bare prompt + one per template) into
padded batches and stops each forward pass right after the edited ``down_proj``: the layers
above it cannot change its input.

Not here: the value side (pmedit.values) and the solve (pmkernels.solve).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from pmedit.hooks import Trace
from pmedit.models import ModelSpec
from pmedit.requests import EditRequest, normalize_requests
from pmedit.tokens import encode_prompt, encode_subject_prompt, pad_batch, pad_id

log = logging.getLogger(__name__)

DEFAULT_STARTERS = ("The", "Therefore", "Because", "I", "You")


def model_device(model: nn.Module) -> torch.device:
    """Where the input ids go: the device of the input embeddings."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return emb.weight.device
    return next(model.parameters()).device


@torch.no_grad()
def context_templates(
    model: nn.Module,
    tok,
    *,
    n: int = 5,
    length: int = 10,
    seed: int = 0,
    starters: Sequence[str] = DEFAULT_STARTERS,
    top_k: int = 5,
) -> list[str]:
    """``n`` prefixes of about ``length`` tokens sampled from the model, as ``"<text>. {}"``.

    Template ``i`` starts from ``starters[i % len(starters)]`` and continues with top-k sampling
    (k=5, as MEMIT) from a ``torch.Generator`` seeded with ``seed``; sampling happens on the CPU
    so the same seed gives the same choices on any device. Braces in the text are doubled (the
    templates are format strings). The bare prompt is not among them: compute_keys weights it
    separately. Call this on the unedited model; the result is deterministic for given weights.
    """
    if n < 0 or length < 1:
        raise ValueError(f"context_templates: need n >= 0 and length >= 1, got n={n}, length={length}")
    if n == 0:
        return []
    if not starters or not all(isinstance(s, str) and s.strip() for s in starters):
        raise ValueError(f"context_templates: starters must be non-empty strings, got {starters!r}")
    was_training = model.training
    model.eval()
    try:
        device = model_device(model)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        seqs = [encode_prompt(tok, starters[i % len(starters)]).ids for i in range(n)]
        n_prompt = [len(s) for s in seqs]
        stop_ids = {getattr(tok, "eos_token_id", None), getattr(tok, "pad_token_id", None)} - {None}
        done = [False] * n
        pad = pad_id(tok)
        for _ in range(length):
            live = [i for i in range(n) if not done[i] and _n_text(tok, seqs[i]) < length]
            if not live:
                break
            ids, mask = pad_batch([seqs[i] for i in live], pad, device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            last = mask.sum(1) - 1
            nxt = logits[torch.arange(len(live), device=device), last].float().cpu()
            top = torch.topk(nxt, k=min(top_k, nxt.shape[-1]), dim=-1)
            probs = torch.softmax(top.values, dim=-1)
            choice = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            for j, i in enumerate(live):
                t = int(top.indices[j, choice[j]])
                if t in stop_ids:
                    done[i] = True
                else:
                    seqs[i].append(t)
        out = []
        for i, s in enumerate(seqs):
            text = tok.decode(s, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            out.append(text.replace("{", "{{").replace("}", "}}") + ". {}")
        log.debug("context templates (prompt lengths %s): %s", n_prompt, out)
        return out
    finally:
        model.train(was_training)


def _has_bos(tok, ids: list[int]) -> bool:
    bos = getattr(tok, "bos_token_id", None)
    return bool(ids) and bos is not None and ids[0] == bos


def _n_text(tok, ids: list[int]) -> int:
    """Tokens of text (a leading BOS does not count towards a template's length)."""
    return len(ids) - (1 if _has_bos(tok, ids) else 0)


@torch.no_grad()
def compute_keys(
    model: nn.Module,
    tok,
    spec: ModelSpec,
    layer: int,
    requests: Sequence[EditRequest | dict],
    templates: Sequence[str],
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """Keys [E, d] (fp32, on the model's device), one row per request.

    Row e is ½·k(bare prompt) + ½·mean_j k(template_j filled with the prompt), with k the input
    of ``down_proj`` of ``layer`` at the subject's last token (just the bare prompt when there are
    no templates). ``batch_size`` counts sequences per forward pass; rows of all requests share
    batches, sorted by length to waste little on padding.
    """
    reqs = normalize_requests(requests)
    if batch_size < 1:
        raise ValueError(f"compute_keys: batch_size must be >= 1, got {batch_size}")
    name = spec.down_proj_name(layer)
    d = spec.intermediate_size
    device = model_device(model)
    out_device = spec.down_proj(model, layer).weight.device
    if not reqs:
        return torch.zeros((0, d), dtype=torch.float32, device=out_device)
    ctx: list[str | None] = [None, *templates]
    rows = []  # (request index, context index, encoded prompt)
    for e, r in enumerate(reqs):
        for c, t in enumerate(ctx):
            rows.append((e, c, encode_subject_prompt(tok, r, t)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][2].ids))
    bare = torch.zeros((len(reqs), d), dtype=torch.float32, device=out_device)
    ctx_sum = torch.zeros((len(reqs), d), dtype=torch.float32, device=out_device)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[s : s + batch_size]]
            ids, mask = pad_batch([b[2].ids for b in batch], pad_id(tok), device)
            with Trace(model, name, retain_input=True, stop=True) as tr:
                tr.run(input_ids=ids, attention_mask=mask, use_cache=False)
            x = tr.inputs[name]
            if x is None or x.shape[-1] != d:
                raise RuntimeError(f"compute_keys: input of {name} has shape {None if x is None else tuple(x.shape)}; "
                                   f"expected [..., {d}]")
            pos = torch.tensor([b[2].subject_last for b in batch], device=x.device)
            k = x[torch.arange(len(batch), device=x.device), pos].float().to(out_device)
            eidx = torch.tensor([b[0] for b in batch], device=out_device)
            is_bare = torch.tensor([b[1] == 0 for b in batch], device=out_device)
            bare.index_add_(0, eidx[is_bare], k[is_bare])
            ctx_sum.index_add_(0, eidx[~is_bare], k[~is_bare])
    finally:
        model.train(was_training)
    if not templates:
        return bare
    return 0.5 * bare + 0.5 * ctx_sum / len(templates)
