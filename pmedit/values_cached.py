"""The ``engine="cached"`` forward of value optimisation: only what δ can change is recomputed.

δ is added to decoder layer ``l``'s output at the subject's last token (position s of its row).
So, for every step, (a) nothing below layer l+1 changes, and (b) no position before s changes at
any layer (causal attention). Split each row at s into a prefix ids[:s] and a suffix ids[s:]:

- once per row (no grad, fp32): the prefix through every layer, keeping each layer's keys and
  values (post-rotary, as a KV cache holds them); then the suffix through layers 0..l with that
  cache, keeping layer l's output at the suffix (``base``; its column 0 is h for the bare row);
- every step: ``base`` with δ added at column 0 through layers l+1.. with the cached prefix keys
  and values, the final norm and lm_head at the scored positions only.

Rows are right padded in both parts (every query attends at least to itself, so no padded row is
ever fully masked and no NaN can reach a real row through a masked value); the 4-D masks and the
position ids (s + column) are built here, so positions and rotary phases are those of the
unsplit row. These passes use the model's ``eager`` attention (the config's implementation is
switched while they run and restored after): at a few query positions per row the plain
matmul-softmax is faster than CPU SDPA, whose backward is 5x (fp32) to 18x (bf16) slower here.
``dtype="bfloat16"`` runs the per-step layers under autocast with their matrices cast to bf16
once per call (matmuls in bf16; residual stream, δ, Adam, final norm, logits and losses in
fp32); the once-per-row passes stay fp32, so h is exact. The same function of δ as the full
pass, up to summation order (fp32) or bf16 matmul rounding.

Needs a Llama-style decoder (``embed_tokens``-like input embeddings, a ``rotary_emb`` on the body,
layers called as ``layer(hidden, attention_mask=, position_embeddings=, position_ids=, cache=)``
whose attention calls ``cache.update(k, v, layer_idx)`` and reads
``config._attn_implementation``); anything else is refused with the reason (use
``engine="full"``).

Not here: the loop, losses and Adam (pmedit.values).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

ATTENTION = "eager"


class _PrefixKV:
    """The minimal cache the attention layers call: records the prefix's keys and values, then
    returns them concatenated in front of the suffix's (never storing the suffix)."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.recording:
            self.k[layer_idx], self.v[layer_idx] = k, v
            return k, v
        if layer_idx not in self.k:
            return k, v
        return torch.cat([self.k[layer_idx], k], dim=2), torch.cat([self.v[layer_idx], v], dim=2)

    def rows(self, idx: torch.Tensor, layers: Sequence[int]) -> _PrefixKV:
        out = _PrefixKV()
        out.recording = False
        for i in layers:
            if i in self.k:
                out.k[i], out.v[i] = self.k[i].index_select(0, idx), self.v[i].index_select(0, idx)
        return out


def check_supported(model: nn.Module, body: nn.Module) -> None:
    if not hasattr(getattr(model, "config", None), "_attn_implementation"):
        raise ValueError(f"optimize_values engine 'cached': {type(model).__name__} has no config._attn_implementation "
                         "(a transformers decoder is needed); use engine='full'")
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(f"optimize_values engine 'cached': the model spans devices {sorted(map(str, devices))} "
                         "(device_map); use engine='full'")
    if not hasattr(body, "rotary_emb"):
        raise ValueError(f"optimize_values engine 'cached': {type(body).__name__} has no rotary_emb "
                         "(a Llama-style decoder is needed); use engine='full'")


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """The model's attention layers use the eager implementation inside the block."""
    cfg = model.config
    before = cfg._attn_implementation
    cfg._attn_implementation = ATTENTION
    try:
        yield
    finally:
        cfg._attn_implementation = before


def _run_layers(layers, hs, mask, pos_emb, pos, cache, params=None):
    for i, layer in enumerate(layers):
        kwargs = dict(attention_mask=mask, position_embeddings=pos_emb, position_ids=pos, cache=cache, use_cache=False)
        if params is None:
            out = layer(hs, **kwargs)
        else:  # the layer with some of its parameters replaced (bf16 copies of its matrices)
            out = torch.func.functional_call(layer, params[i], (hs,), kwargs, strict=False)
        hs = out[0] if isinstance(out, tuple) else out
    return hs


def _mask(valid_kv: torch.Tensor, n_q: int, q_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, n_q, n_kv] additive attention mask (eager): key valid and causal (key column ≤
    q_offset + query column), and always the query's own column."""
    n_kv = valid_kv.shape[1]
    q = torch.arange(n_q, device=valid_kv.device)[:, None] + q_offset
    k = torch.arange(n_kv, device=valid_kv.device)[None, :]
    allowed = (valid_kv[:, None, :] & (k <= q)[None]) | (k == q)[None]
    allowed = allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class CachedGroup:
    """One set of rows (a length group of the chunk's rows), prepared once; ``view(active)`` gives
    the rows of the still-active edits. Index conventions as pmedit.values._Group: ``tok_*`` are
    target tokens (column in the suffix), ``kl_*`` the KL rows, ``bare_*`` the bare prompts; edit
    indices are positions in the ``active`` list given to ``view``."""

    def __init__(self, model: nn.Module, body: nn.Module, spec, layer: int, rows: list[tuple], pad: int,
                 device: torch.device, *, kl_at_subject: bool, pad_batch, params=None):
        self.layer = layer
        self.upper = list(range(layer + 1, spec.n_layers))
        self.upper_modules = [spec.layer(model, i) for i in self.upper]
        self.params = params  # None, or per upper layer {name: bf16 copy} of its matrices
        self.model = model
        self.rotary = body.rotary_emb
        starts = [enc.subject_last for (_, _, enc, _) in rows]
        prefixes = [enc.ids[:s] for (_, _, enc, _), s in zip(rows, starts)]
        suffixes = [enc.ids[s:] for (_, _, enc, _), s in zip(rows, starts)]
        self.row_edit = [j for (j, _, _, _) in rows]
        self.tok, self.kl, self.bare = [], [], []  # (row, column in the suffix, target, edit, weight)
        for ri, ((j, kind, enc, weight), s) in enumerate(zip(rows, starts)):
            if kind == "kl":
                self.kl.append((ri, (s if kl_at_subject else len(enc.ids) - 1) - s, j))
                continue
            if kind == "bare":
                self.bare.append((ri, j))
            for t, target in enumerate(enc.target_ids):
                self.tok.append((ri, enc.first_scored + t - s, target, j, weight))
        embed = model.get_input_embeddings()
        all_layers = [spec.layer(model, i) for i in range(layer + 1)]
        cache = _PrefixKV()
        start = torch.tensor(starts, dtype=torch.long, device=device)
        with torch.no_grad(), eager_attention(model):
            p_ids, p_mask = pad_batch(prefixes, pad, device) if max(map(len, prefixes)) else (None, None)
            s_ids, s_mask = pad_batch(suffixes, pad, device)
            self.n_prefix = 0 if p_ids is None else p_ids.shape[1]
            dtype = embed.weight.dtype
            if p_ids is not None:
                hs = embed(p_ids)
                pos = torch.arange(self.n_prefix, device=device)[None].expand(len(rows), -1)
                pe = self.rotary(hs, pos)
                mask = _mask(p_mask.bool(), self.n_prefix, 0, hs.dtype)
                _run_layers([spec.layer(model, i) for i in range(spec.n_layers)], hs, mask, pe, pos, cache)
            cache.recording = False
            valid = s_mask.bool() if p_ids is None else torch.cat([p_mask.bool(), s_mask.bool()], dim=1)
            self.pos = start[:, None] + torch.arange(s_ids.shape[1], device=device)[None]
            hs = embed(s_ids)
            self.valid = valid
            mask = _mask(valid, s_ids.shape[1], self.n_prefix, dtype)
            self.pos_emb = self.rotary(hs, self.pos)
            self.base = _run_layers(all_layers, hs, mask, self.pos_emb, self.pos, cache).float()
        self.cache = cache.rows(torch.arange(len(rows), device=device), self.upper)
        self.device = device
        self.n_rows = len(rows)
        self._views: dict[tuple, _View] = {}

    def h_rows(self) -> tuple[list[int], torch.Tensor]:
        """(edit of each bare row, layer l's unedited output at its subject [n_bare, hidden])."""
        rows = torch.tensor([r for r, _ in self.bare], dtype=torch.long, device=self.device)
        return [j for _, j in self.bare], self.base[rows, 0]

    def view(self, active: list[int]) -> _View:
        key = tuple(active)
        if key not in self._views:
            self._views = {key: _View(self, active)}  # only the latest is reused
        return self._views[key]


class _View:
    """The rows of one CachedGroup whose edits are active, with edit indices remapped."""

    def __init__(self, g: CachedGroup, active: list[int]):
        where = {e: j for j, e in enumerate(active)}
        keep = [ri for ri in range(g.n_rows) if g.row_edit[ri] in where]
        new = {ri: k for k, ri in enumerate(keep)}
        dev = g.device
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        idx = as_long(keep)
        self.g = g
        self.empty = not keep
        if self.empty:
            return
        self.base = g.base.index_select(0, idx)
        self.pos = g.pos.index_select(0, idx)
        self.pos_emb = tuple(t.index_select(0, idx) for t in g.pos_emb)
        self.mask = _mask(g.valid.index_select(0, idx), g.pos.shape[1], g.n_prefix, g.base.dtype)
        self.cache = g.cache.rows(idx, g.upper)
        self.row_edit = as_long([where[g.row_edit[ri]] for ri in keep])
        tok = [t for t in g.tok if t[0] in new]
        kl = [t for t in g.kl if t[0] in new]
        bare = [t for t in g.bare if t[0] in new]
        self.tok_row, self.tok_col = as_long([new[t[0]] for t in tok]), as_long([t[1] for t in tok])
        self.tok_target, self.tok_edit = as_long([t[2] for t in tok]), as_long([where[t[3]] for t in tok])
        self.tok_weight = torch.tensor([t[4] for t in tok], device=dev)
        self.kl_row, self.kl_col = as_long([new[t[0]] for t in kl]), as_long([t[1] for t in kl])
        self.kl_edit = as_long([where[t[2]] for t in kl])
        self.bare_row, self.bare_edit = as_long([new[t[0]] for t in bare]), as_long([where[t[1]] for t in bare])
        self.zeros = torch.zeros(len(keep), dtype=torch.long, device=dev)

    def selected_hidden(self, d_param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Final-layer hidden states (before the final norm, fp32) at the scored target positions
        then the KL positions, with δ (rows indexed like ``row_edit``) added at the subject."""
        x = self.base.index_put((torch.arange(len(self.zeros), device=self.base.device), self.zeros),
                                d_param[self.row_edit], accumulate=True)
        autocast = (torch.autocast(self.base.device.type, dtype=dtype) if dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast, eager_attention(self.g.model):
            x = _run_layers(self.g.upper_modules, x, self.mask, self.pos_emb, self.pos, self.cache,
                            self.g.params if dtype != torch.float32 else None)
        r = torch.cat([self.tok_row, self.kl_row])
        c = torch.cat([self.tok_col, self.kl_col])
        return x[r, c].float()


def make_cached_groups(model, body, spec, layer, rows: list[tuple], pad: int, device, *, kl_at_subject: bool,
                       overhead: int, dtype: torch.dtype = torch.float32) -> list[CachedGroup]:
    """Rows (edit index, kind, encoding, weight) grouped by suffix length (the padding that is
    paid every step), each group prepared once."""
    from pmedit.tokens import pad_batch
    from pmedit.values import _group_by_length

    check_supported(model, body)
    lengths = [len(enc.ids) - enc.subject_last for (_, _, enc, _) in rows]
    groups = _group_by_length(lengths, overhead)
    params = None
    if dtype != torch.float32:  # matrices cast once here, not at every matmul by autocast
        params = [{name: p.detach().to(dtype) for name, p in spec.layer(model, i).named_parameters() if p.ndim == 2}
                  for i in range(layer + 1, spec.n_layers)]
    return [CachedGroup(model, body, spec, layer, [rows[i] for i in g], pad, device,
                        kl_at_subject=kl_at_subject, pad_batch=pad_batch, params=params) for g in groups]
