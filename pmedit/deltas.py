"""The one file format for edits: deltas that reproduce the edited weights bit for bit.

A deltas file is safetensors written through :func:`pmedit.fileio.save_verified` (a SHA-256 over
the metadata and every tensor's bytes: a flipped bit is refused, naming the file). Per edited
module it holds ``delta.<module>`` = W − W₀ in twice the weight's precision (fp64 for fp32
weights, fp32 for 16-bit ones). That difference is exact unless W and W₀ are many binades apart
(cancellation: W₀ = −0.0165, W = −1.6e−7), so the writer checks that W₀ + Δ rounds back to W
everywhere and stores the few elements where it does not as ``fix.<module>.index`` /
``fix.<module>.value`` (the edited weights themselves). Loading is therefore exact for every
dtype. The metadata names the modules, shapes, dtypes, the model fingerprint and a SHA-256 of
each original matrix; the state an Editor needs to continue a sequence (keys kept in the
preservation term, a method's own state) travels as ``kept.<layer>.<i>`` and ``state.<name>``.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmedit.fileio import load_verified, save_verified

DELTAS_FORMAT = "pmedit-deltas/2"


def delta_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def weight_sha256(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def apply_delta(W0: torch.Tensor, delta: torch.Tensor, fix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The edited weight W from W₀, its stored delta and fix-up elements (exact)."""
    W = (W0.detach().to(delta.dtype) + delta.to(W0.device)).to(W0.dtype)
    if fix is not None and fix[0].numel():
        W.view(-1)[fix[0].to(W.device)] = fix[1].to(device=W.device, dtype=W.dtype)
    return W


def split_delta(W0: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(delta, (index, value)) such that ``apply_delta(W0, delta, fix)`` equals W bit for bit."""
    acc = delta_dtype(W.dtype)
    delta = W.detach().to(acc) - W0.detach().to(acc)
    back = (W0.detach().to(acc) + delta).to(W.dtype)
    # Compare bits, not values: -0.0 vs 0.0 and NaN payloads must survive too.
    ib = torch.int16 if W.element_size() == 2 else (torch.int32 if W.element_size() == 4 else torch.int64)
    wrong = (back.view(ib) != W.detach().view(ib)).reshape(-1).nonzero().reshape(-1)
    return delta, (wrong.cpu(), W.detach().reshape(-1)[wrong].cpu())


@dataclass
class DeltasFile:
    """What a deltas file holds, verified: per-layer deltas and fixes, the metadata, and the
    state that continuing the sequence needs."""

    path: Path
    meta: dict
    deltas: dict[int, torch.Tensor]
    fixes: dict[int, tuple[torch.Tensor, torch.Tensor]]
    kept_keys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def write_deltas(
    path: str | os.PathLike,
    *,
    originals: Mapping[int, torch.Tensor],
    current: Mapping[int, torch.Tensor],
    module_names: Mapping[int, str],
    meta: Mapping[str, Any],
    kept_keys: Mapping[int, list[torch.Tensor]] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the edits (``current`` − ``originals`` per layer) atomically, verified."""
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for layer, W0 in originals.items():
        name = module_names[layer]
        delta, (idx, val) = split_delta(W0, current[layer])
        tensors[f"delta.{name}"] = delta
        tensors[f"fix.{name}.index"] = idx
        tensors[f"fix.{name}.value"] = val
        modules[str(layer)] = {
            "name": name, "shape": list(W0.shape), "dtype": _dtype_name(W0.dtype),
            "delta_dtype": _dtype_name(delta.dtype), "base_sha256": weight_sha256(W0), "fixes": int(idx.numel()),
        }
    for layer, Ks in (kept_keys or {}).items():
        for i, K in enumerate(Ks):
            tensors[f"kept.{layer}.{i}"] = K
    for k, v in (state or {}).items():
        tensors[f"state.{k}"] = v
    full = {"format": DELTAS_FORMAT, **meta, "modules": modules,
            "kept": {str(layer): len(Ks) for layer, Ks in (kept_keys or {}).items()},
            "state": sorted(state or {})}
    return save_verified(path, tensors, full)


def read_deltas(path: str | os.PathLike) -> DeltasFile:
    """Read and verify a deltas file; ValueError naming the file for anything amiss."""
    path = Path(path)
    tensors, meta = load_verified(path, what="deltas file")
    if meta.get("format") != DELTAS_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {DELTAS_FORMAT!r}"
                         + (" (written by an older pmedit without a payload hash: re-save it)"
                            if meta.get("format") == "pmedit-deltas/1" else ""))
    for key in ("modules", "layers", "hparams", "model_fingerprint"):
        if key not in meta:
            raise ValueError(f"{path}: metadata lacks {key!r}")
    out = DeltasFile(path, meta, {}, {})
    for layer_s, m in meta["modules"].items():
        layer, name = int(layer_s), m["name"]
        try:
            d = tensors[f"delta.{name}"]
            fix = (tensors[f"fix.{name}.index"], tensors[f"fix.{name}.value"])
        except KeyError as e:
            raise ValueError(f"{path}: tensor {e.args[0]!r} is missing") from None
        if list(d.shape) != m["shape"]:
            raise ValueError(f"{path}: tensor delta.{name} has shape {list(d.shape)}, metadata says {m['shape']}")
        out.deltas[layer], out.fixes[layer] = d, fix
    for layer_s, n in meta.get("kept", {}).items():
        out.kept_keys[int(layer_s)] = [tensors[f"kept.{layer_s}.{i}"] for i in range(n)]
    out.state = {k: tensors[f"state.{k}"] for k in meta.get("state", [])}
    return out


def edited_weights(f: DeltasFile, originals: Mapping[int, torch.Tensor], module_names: Mapping[int, str],
                   fingerprint: str) -> dict[int, torch.Tensor]:
    """The edited weight of every layer in ``originals``, after checking the file against them:
    the model fingerprint, module name, shape, dtype, the SHA-256 of each original, and
    finiteness of the result."""
    from pmedit.methods.base import finite_or_error

    if fingerprint != f.meta["model_fingerprint"]:
        raise ValueError(f"{f.path}: saved from a model with fingerprint {f.meta['model_fingerprint']}, this "
                         f"model has {fingerprint} (another checkpoint or dtype, or already edited)")
    out = {}
    for layer, W0 in originals.items():
        m = f.meta["modules"].get(str(layer))
        if m is None:
            raise ValueError(f"{f.path}: metadata lists no module for layer {layer}")
        if m["name"] != module_names[layer]:
            raise ValueError(f"{f.path}: layer {layer} is module {m['name']!r} there, {module_names[layer]!r} in this model")
        if list(W0.shape) != m["shape"] or _dtype_name(W0.dtype) != m["dtype"]:
            raise ValueError(f"{f.path}: {m['name']} was {m['dtype']} {m['shape']}, this model has "
                             f"{_dtype_name(W0.dtype)} {list(W0.shape)}")
        if weight_sha256(W0) != m["base_sha256"]:
            raise ValueError(f"{f.path}: {m['name']} differs from the weights the deltas were made "
                             "from (SHA-256 mismatch): load them into the unedited model")
        with torch.no_grad():
            out[layer] = finite_or_error(apply_delta(W0, f.deltas[layer], f.fixes[layer]),
                                         f"{f.path}: layer {layer} ({m['name']})")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
