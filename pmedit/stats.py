"""C0 statistics: the uncentred second moment E[k kᵀ] of MLP keys over a text corpus.

ROME/MEMIT/EMMET protect what a layer already knows through C0 = E[k kᵀ], where k is the
input of the layer's ``down_proj``, averaged over ~10⁵–10⁸ tokens of generic text. This module
gets those numbers right and cheaply:

- One forward pass per batch serves every requested layer, and the pass stops right after the
  deepest requested ``down_proj`` (a :class:`pmedit.hooks.Trace` with ``stop=True``); the
  reference code runs one pass per layer.
- Documents are tokenised in a seeded order, truncated to the context length, cut to exactly
  ``max_tokens`` tokens, and packed longest-first into batches of about ``batch_tokens``
  (padded) tokens, so there is little padding; padding rows are dropped through the attention
  mask. Sums go into :class:`pmkernels.covariance.SecondMoment` (fp32 chunks, fp64 master).
- Results are cached, one safetensors file per (model fingerprint, layer, corpus id, token
  count, dtype) under ``$PMEDIT_CACHE/stats`` with JSON metadata and a SHA-256 checksum that
  are verified on every load; a file that fails (corrupt, or made for something else) is
  recomputed with a warning.
- Each batch's fp32 partial sum is flushed into the fp64 sum at the batch's end, so the result
  depends only on which batches were summed: a run killed at any point and resumed from its
  checkpoint (written atomically every ``checkpoint_tokens`` tokens, at batch boundaries)
  reproduces the uninterrupted result bit for bit, and the ranks of a distributed run
  (:mod:`pmedit.stats_distributed`) add up to it within fp64 rounding.

Not here: the covariance kernels (pmkernels.covariance), several processes
(pmedit.stats_distributed), bundles and MEMIT ``.npz`` files (pmedit.stats_bundle, re-exported
here), or what the editor does with C0.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pmedit.fileio import load_verified, remove_stale_temps, remove_stale_temps_in, save_verified
from pmedit.corpus import Corpus, resolve_corpus
from pmedit.hooks import Trace
from pmedit.models import ModelSpec, cache_root
from pmedit.stats_bundle import (  # noqa: F401
    export_bundle, export_npz, import_bundle, import_npz, import_npz_to_cache, read_bundle)
from pmedit.tokens import encode_documents, pad_batch, pad_id

log = logging.getLogger(__name__)

FORMAT = "pmedit-stats-1"
CHECKPOINT_FORMAT = "pmedit-stats-checkpoint-1"
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_CHECKPOINT_TOKENS = 1_000_000
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class LayerStats:
    """C0 of one layer: ``mean`` = Σ k kᵀ / count (fp64 [d, d], CPU) and the token ``count``."""

    mean: torch.Tensor
    count: int
    layer: int | None = None
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def sum(self) -> torch.Tensor:
        return self.mean * self.count

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


# ----------------------------------------------------------------------------------------
# planning: which tokens, in which batches


@dataclass
class Plan:
    """The exact token sequences of a collection run, in batch order, and their digest."""

    batches: list[list[list[int]]]
    tokens: int
    digest: str
    max_length: int
    documents: int


def context_length(model: nn.Module, tokenizer=None) -> int:
    """The longest sequence the model was trained on (config), capped by the tokenizer's limit."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        n = min(n, tok_max) if n else tok_max
    if not n:
        raise ValueError(f"{type(model).__name__}: cannot tell its context length; pass max_length=")
    return int(n)


def plan_batches(tokenizer, corpus: Corpus, *, max_tokens: int, batch_tokens: int, max_length: int,
                 seed: int = 0, chunk_docs: int = 256) -> Plan:
    """Tokenise documents in seeded order until ``max_tokens``; pack them longest-first.

    The last document is cut so the total is exactly ``max_tokens`` (fewer only when the
    corpus runs out, with a warning). A batch holds rows while rows × longest ≤ batch_tokens;
    a document longer than ``batch_tokens`` gets a batch of its own.
    """
    docs: list[list[int]] = []
    total = 0
    n_docs = 0
    chunk: list[str] = []

    def flush() -> bool:
        nonlocal total
        enc = encode_documents(tokenizer, chunk, max_length=max_length)
        chunk.clear()
        for ids in enc:
            if not ids:
                continue
            take = min(len(ids), max_tokens - total)
            docs.append(list(ids[:take]))
            total += take
            if total >= max_tokens:
                return True
        return False

    done = False
    want = 8  # tokenise in growing chunks: a small budget should not pay for 256 documents
    for text in corpus.shuffled(seed):
        n_docs += 1
        if text.strip():
            chunk.append(text)
        if len(chunk) >= want:
            if done := flush():
                break
            want = min(2 * want, chunk_docs)
    if not done and chunk:
        flush()
    if total == 0:
        raise ValueError(f"corpus {corpus.id!r} yielded no tokens")
    if total < max_tokens:
        warnings.warn(f"corpus {corpus.id!r} holds only {total} tokens (< max_tokens={max_tokens}); using them all",
                      stacklevel=3)
    order = sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i))
    batches: list[list[list[int]]] = []
    cur: list[list[int]] = []
    width = 0
    for i in order:
        d = docs[i]
        if cur and (len(cur) + 1) * width > batch_tokens:
            batches.append(cur)
            cur = []
        if not cur:
            width = len(d)
        cur.append(d)
    if cur:
        batches.append(cur)
    h = hashlib.sha256(f"{max_length}|".encode())
    for b in batches:
        h.update(b"B")
        for d in b:
            h.update(np.asarray(d, dtype=np.int64).tobytes())
            h.update(b"|")
    return Plan(batches, total, h.hexdigest()[:16], max_length, len(docs))


# ----------------------------------------------------------------------------------------
# collection


def _normalize_layers(spec: ModelSpec, layers: int | Iterable[int]) -> list[int]:
    if isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers: at least one layer index is required")
    for i, layer in enumerate(layers):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layers[{i}] is {layer!r}; layer indices must be ints")
        spec.layer_name(int(layer))  # raises LayerIndexError with the valid range
    return sorted({int(x) for x in layers})


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """Write a safetensors file with ``meta`` (+ checksum) under a temp name, then rename."""
    save_verified(path, tensors, meta)


def _verified_load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a file written by _atomic_save; ValueError (without the path: callers
    add it with their context) when it does not verify."""
    try:
        return load_verified(path, what="statistics file")
    except ValueError as e:
        raise ValueError(str(e).removeprefix(f"{path}: ")) from None


def collect_second_moments(
    model: nn.Module,
    tokenizer,
    layers: int | Iterable[int],
    corpus="wiki-offline",
    *,
    max_tokens: int,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    seed: int = 0,
    max_length: int | None = None,
    progress: bool = True,
    backend: str = "auto",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_tokens: int = DEFAULT_CHECKPOINT_TOKENS,
    spec: ModelSpec | None = None,
) -> dict:
    """Σ k kᵀ over ``max_tokens`` corpus tokens for each layer's down_proj input.

    Returns ``{layer: pmkernels.covariance.SecondMoment}``. With ``checkpoint`` (a file path),
    partial sums are saved there every ``checkpoint_tokens`` tokens and a matching checkpoint
    found at the start is resumed; the caller deletes it when done.
    """
    from pmkernels.covariance import SecondMoment

    for name, v in (("max_tokens", max_tokens), ("batch_tokens", batch_tokens), ("checkpoint_tokens", checkpoint_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    spec = spec or ModelSpec.from_model(model)
    layers = _normalize_layers(spec, layers)
    corpus = resolve_corpus(corpus)
    max_length = int(max_length or context_length(model, tokenizer))
    plan = plan_batches(tokenizer, corpus, max_tokens=max_tokens, batch_tokens=batch_tokens,
                        max_length=max_length, seed=seed)
    sms = {}
    for layer in layers:
        dev = spec.down_proj(model, layer).weight.device
        sms[layer] = SecondMoment(spec.intermediate_size, device=dev, backend=backend)

    ckpt_meta = {"format": CHECKPOINT_FORMAT, "fingerprint": spec.fingerprint, "plan": plan.digest,
                 "layers": layers, "dtype": _DTYPE_NAMES.get(spec.dtype, str(spec.dtype))}
    start, tokens_done = 0, 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None:
        remove_stale_temps(ckpt_path)
    if ckpt_path is not None and ckpt_path.exists():
        start, tokens_done = _resume(ckpt_path, ckpt_meta, sms, plan)

    log.info("C0 statistics for layers %s: %d tokens from %s (%d documents) in %d batches%s", layers,
             plan.tokens, corpus.id, plan.documents, len(plan.batches),
             f", resuming at batch {start}" if start else "")

    def after_batch(b: int, before: int, done: int) -> None:
        last = b == len(plan.batches) - 1
        if ckpt_path is not None and not last and done // checkpoint_tokens > before // checkpoint_tokens:
            _write_checkpoint(ckpt_path, ckpt_meta, sms, b + 1, done)

    desc = f"C0 layers {layers[0]}..{layers[-1]}" if len(layers) > 1 else f"C0 layer {layers[0]}"
    run_batches(model, tokenizer, spec, sms, plan.batches, range(start, len(plan.batches)), tokens_done=tokens_done,
                total=plan.tokens, after_batch=after_batch, progress=progress, desc=desc)
    counts = {layer: sm.count for layer, sm in sms.items()}
    if any(c != plan.tokens for c in counts.values()):  # an accounting bug, never user input
        raise RuntimeError(f"token accounting mismatch: planned {plan.tokens}, counted {counts}")
    return sms


def flush_batch(sms: dict) -> None:
    """Move every accumulator's fp32 tile into its fp64 sum at a batch boundary.

    Each batch then enters the fp64 sum as its own fp32 partial sum, so the result depends only
    on which batches were summed, not on how they were spread over runs or processes:
    ranks of a distributed run and a resumed run all match one uninterrupted process to fp64
    rounding (≤ 1e-15 relative). The cost is one d×d add per batch. pmkernels.SecondMoment has
    no public name for this yet, hence the private call.
    """
    for sm in sms.values():
        sm._flush()


def run_batches(model: nn.Module, tokenizer, spec: ModelSpec, sms: dict, batches: list[list[list[int]]],
                indices: Iterable[int], *, tokens_done: int = 0, total: int | None = None, after_batch=None,
                progress: bool = True, desc: str = "C0") -> int:
    """One forward pass per batch ``batches[i]`` for i in ``indices``, stopping after the deepest
    layer of ``sms`` ({layer: SecondMoment}); adds the real tokens' keys to each. Calls
    ``after_batch(i, tokens_before, tokens_after)`` after each batch; returns the tokens done."""
    from tqdm.auto import tqdm

    names = {layer: spec.down_proj_name(layer) for layer in sms}
    pad = pad_id(tokenizer)
    device = _input_device(model)
    bar = tqdm(total=total, initial=tokens_done, unit="tok", unit_scale=True, disable=not progress, desc=desc)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), Trace(model, list(names.values()), retain_input=True, stop=True) as tr:
            for b in indices:
                ids, mask = pad_batch(batches[b], pad, device)
                tr.run(input_ids=ids, attention_mask=mask, use_cache=False)
                keep = mask.bool()
                for layer, name in names.items():
                    x = tr.inputs[name]
                    sms[layer].update(x, keep.to(x.device))
                tr.inputs.clear()  # free the activations before the next batch
                flush_batch(sms)
                n = int(keep.sum())
                before, tokens_done = tokens_done, tokens_done + n
                bar.update(n)
                if after_batch is not None:
                    after_batch(b, before, tokens_done)
    finally:
        bar.close()
        model.train(was_training)
    return tokens_done


def _write_checkpoint(path: Path, meta: dict, sms: dict, batches_done: int, tokens_done: int) -> None:
    tensors = {}
    for layer, sm in sms.items():
        state = sm.state_dict()  # batches are flushed, so this is exactly what a resumed run starts from
        tensors[f"{layer}.sum"] = state["sum"]
        tensors[f"{layer}.count"] = state["count"].reshape(1)
    _atomic_save(tensors, {**meta, "batches_done": batches_done, "tokens_done": tokens_done}, path)
    log.debug("checkpoint %s: %d batches, %d tokens", path, batches_done, tokens_done)


def _resume(path: Path, meta: dict, sms: dict, plan: Plan) -> tuple[int, int]:
    try:
        tensors, saved = _verified_load(path)
    except ValueError as e:
        warnings.warn(f"ignoring statistics checkpoint {path}: {e}; starting from the beginning", stacklevel=3)
        return 0, 0
    mismatched = [k for k in meta if saved.get(k) != meta[k]]
    if mismatched:
        warnings.warn(f"ignoring statistics checkpoint {path}: made for a different run ({', '.join(mismatched)} "
                      "differ); starting from the beginning", stacklevel=3)
        return 0, 0
    start, tokens_done = int(saved["batches_done"]), int(saved["tokens_done"])
    expect = sum(len(d) for b in plan.batches[:start] for d in b)
    if not 0 < start < len(plan.batches) or expect != tokens_done:
        warnings.warn(f"ignoring statistics checkpoint {path}: inconsistent progress record", stacklevel=3)
        return 0, 0
    for layer, sm in sms.items():
        sm.load_state_dict({"sum": tensors[f"{layer}.sum"], "count": tensors[f"{layer}.count"].reshape(())})
        if sm.count != tokens_done:
            raise RuntimeError(f"checkpoint {path}: layer {layer} counts {sm.count} tokens, progress says {tokens_done}")
    log.info("resuming C0 statistics from %s (%d tokens done)", path, tokens_done)
    return start, tokens_done


# ----------------------------------------------------------------------------------------
# cache


def _versions() -> dict:
    import pmedit

    v = {"pmedit": pmedit.__version__, "torch": torch.__version__}
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return v


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in s)


def _key(spec: ModelSpec, layer: int, corpus_id: str, max_tokens: int, seed: int, max_length: int) -> dict:
    return {"format": FORMAT, "fingerprint": spec.fingerprint, "layer": layer, "module": spec.down_proj_name(layer),
            "corpus": corpus_id, "max_tokens": max_tokens, "dtype": _DTYPE_NAMES.get(spec.dtype, str(spec.dtype)),
            "seed": seed, "max_length": max_length, "dim": spec.intermediate_size}


def stats_path(cache_dir: Path, key: dict) -> Path:
    """One file per (fingerprint, layer, corpus, tokens, dtype) (+ seed and context length)."""
    name = (f"{_safe(key['corpus'])}__L{key['layer']:03d}__n{key['max_tokens']}__{key['dtype']}"
            f"__s{key['seed']}__ctx{key['max_length']}.safetensors")
    return cache_dir / key["fingerprint"] / name


def save_layer_stats(path: Path, key: dict, sum_: torch.Tensor, count: int, **extra) -> None:
    meta = {**key, "count": int(count), "versions": _versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}
    tensors = {"sum": sum_.to(device="cpu", dtype=torch.float64).contiguous(),
               "count": torch.tensor([int(count)], dtype=torch.int64)}
    _atomic_save(tensors, meta, path)


def read_layer_stats(path: Path, key: dict | None = None) -> LayerStats:
    """Load and verify one cached file; ValueError says what is wrong with it."""
    tensors, meta = _verified_load(path)
    if key is not None:
        bad = [k for k in key if meta.get(k) != key[k]]
        if bad:
            raise ValueError("made for a different run: " + ", ".join(f"{k}={meta.get(k)!r} (want {key[k]!r})" for k in bad))
    s, c = tensors.get("sum"), tensors.get("count")
    if s is None or c is None or s.dtype != torch.float64 or s.dim() != 2 or s.shape[0] != s.shape[1]:
        raise ValueError("tensors 'sum' (fp64 [d, d]) and 'count' expected")
    count = int(c.reshape(-1)[0])
    if count != meta.get("count") or count < 1:
        raise ValueError(f"count {count} disagrees with the metadata ({meta.get('count')})")
    return LayerStats(mean=s / count, count=count, layer=meta.get("layer"), meta=meta, path=path)


def load_or_collect(
    model: nn.Module,
    tokenizer,
    layers: int | Iterable[int],
    *,
    corpus="wiki-offline",
    max_tokens: int = 100_000,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    seed: int = 0,
    max_length: int | None = None,
    checkpoint_tokens: int = DEFAULT_CHECKPOINT_TOKENS,
    backend: str = "auto",
) -> dict[int, LayerStats]:
    """C0 for each layer from the cache, collecting (all missing layers in one pass) when absent.

    ``cache_dir`` defaults to ``$PMEDIT_CACHE/stats``. A cached file that is corrupt or does not
    match this model/corpus/token count/dtype is recomputed with a warning.
    """
    spec = ModelSpec.from_model(model)
    layers = _normalize_layers(spec, layers)
    corpus = resolve_corpus(corpus)
    max_length = int(max_length or context_length(model, tokenizer))
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "stats"
    out: dict[int, LayerStats] = {}
    missing = []
    keys = {layer: _key(spec, layer, corpus.id, max_tokens, seed, max_length) for layer in layers}
    # temps of writers killed by SIGKILL (as large as the statistics), cache hit or not
    remove_stale_temps_in(root / spec.fingerprint)
    for layer in layers:
        path = stats_path(root, keys[layer])
        if not path.exists():
            missing.append(layer)
            continue
        try:
            out[layer] = read_layer_stats(path, keys[layer])
            log.debug("C0 layer %d from cache %s", layer, path)
        except ValueError as e:
            warnings.warn(f"cached statistics {path} are unusable ({e}); recomputing", stacklevel=2)
            missing.append(layer)
    if missing:
        k0 = keys[missing[0]]
        ckpt = root / spec.fingerprint / (
            f"{_safe(corpus.id)}__L{'-'.join(map(str, missing))}__n{max_tokens}__{k0['dtype']}"
            f"__s{seed}__ctx{max_length}.checkpoint.safetensors")
        t0 = time.perf_counter()
        sms = collect_second_moments(model, tokenizer, missing, corpus, max_tokens=max_tokens,
                                     batch_tokens=batch_tokens, seed=seed, max_length=max_length,
                                     progress=progress, backend=backend, checkpoint=ckpt,
                                     checkpoint_tokens=checkpoint_tokens, spec=spec)
        elapsed = time.perf_counter() - t0
        for layer in missing:
            path = stats_path(root, keys[layer])
            state = sms[layer].state_dict()
            count = int(state["count"])
            save_layer_stats(path, keys[layer], state["sum"], count, corpus_description=corpus.description,
                             batch_tokens=batch_tokens, seconds=round(elapsed, 2))
            out[layer] = read_layer_stats(path, keys[layer])
        ckpt.unlink(missing_ok=True)
    return {layer: out[layer] for layer in layers}
