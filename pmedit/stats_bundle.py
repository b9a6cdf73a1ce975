"""C0 statistics as files to carry around: portable bundles and MEMIT/EasyEdit ``.npz`` files.

A bundle is a directory: one verified safetensors file per layer (byte-for-byte the cache file,
which carries its own key and checksum) and ``manifest.json`` naming the model fingerprint,
corpus id, token count, layers, dtype, pmedit version and each file's SHA-256, plus a SHA-256
of the manifest itself. ``export_bundle`` writes the manifest last (and removes an old one
first), so a bundle whose export was interrupted has no manifest and is refused; ``import_bundle``
checks everything before it stores a single file, then puts each layer where
:func:`pmedit.stats.load_or_collect` with the same corpus, token count, seed and context length
finds it. Compute statistics once on a big machine, edit on a laptop.

``import_npz`` / ``export_npz`` read and write the MEMIT/EasyEdit layout (``mom2.mom2`` = Σ k kᵀ,
``mom2.count``) with ``np.load(allow_pickle=False)``. Not here: collecting statistics.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pmedit.fileio import atomic_path, atomic_write_json, read_json

if TYPE_CHECKING:  # pmedit.stats imports this module
    from torch import nn

    from pmedit.stats import LayerStats

BUNDLE_FORMAT = "pmedit-stats-bundle-1"
MANIFEST = "manifest.json"
# the cache key fields every layer of one bundle shares (the layer and module differ)
_SHARED = ("format", "fingerprint", "corpus", "max_tokens", "dtype", "seed", "max_length", "dim")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_digest(manifest: Mapping) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def export_bundle(stats: Mapping[int, LayerStats], out_dir: str | os.PathLike) -> Path:
    """Write ``stats`` ({layer: LayerStats} from ``load_or_collect``) as a bundle in ``out_dir``."""
    import pmedit

    out = Path(out_dir)
    if not stats:
        raise ValueError("export_bundle: no layers given")
    keys = {}
    for layer, st in stats.items():
        if st.path is None or not Path(st.path).is_file() or st.meta.get("layer") != layer:
            raise ValueError(f"export_bundle: layer {layer} has no statistics file behind it (load it with "
                             "pmedit.stats.load_or_collect, which reads the cache)")
        keys[layer] = {k: st.meta.get(k) for k in (*_SHARED, "layer", "module")}
    first = keys[min(keys)]
    for layer, k in keys.items():
        bad = [f for f in _SHARED if k[f] != first[f]]
        if bad:
            raise ValueError(f"export_bundle: layer {layer} differs from layer {min(keys)} in {', '.join(bad)}; "
                             "a bundle holds statistics of one run")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # until the new manifest is written, the bundle is invalid
    layers = []
    for layer in sorted(stats):
        st = stats[layer]
        name = f"layer{layer:03d}.safetensors"
        with atomic_path(out / name) as tmp:
            shutil.copyfile(st.path, tmp)
        layers.append({"layer": layer, "module": keys[layer]["module"], "file": name, "count": int(st.count),
                       "sha256": _file_sha256(out / name)})
    manifest = {
        "format": BUNDLE_FORMAT,
        "pmedit": pmedit.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_fingerprint": first["fingerprint"],
        "corpus": first["corpus"],
        "corpus_description": stats[min(stats)].meta.get("corpus_description"),
        "tokens": first["max_tokens"],
        "dtype": first["dtype"],
        "seed": first["seed"],
        "max_length": first["max_length"],
        "dim": first["dim"],
        "stats_format": first["format"],
        "layers": layers,
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    atomic_write_json(out / MANIFEST, manifest)
    return out


def read_bundle(bundle_dir: str | os.PathLike) -> tuple[dict, dict[int, LayerStats]]:
    """(manifest, {layer: LayerStats}) of a bundle, every byte verified; ValueError says what is wrong."""
    from pmedit.stats import FORMAT, read_layer_stats

    d = Path(bundle_dir)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise ValueError(f"{d}: not a statistics bundle (no {MANIFEST}; an interrupted export leaves none)")
    m = read_json(mpath, what="bundle manifest")
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{mpath}: format {m.get('format') if isinstance(m, dict) else None!r}, "
                         f"expected {BUNDLE_FORMAT!r}")
    if m.get("manifest_sha256") != _manifest_digest(m):
        raise ValueError(f"{mpath}: manifest checksum mismatch (edited or damaged)")
    if m.get("stats_format") != FORMAT:
        raise ValueError(f"{mpath}: statistics format {m.get('stats_format')!r}, this pmedit reads {FORMAT!r}")
    out = {}
    for entry in m["layers"]:
        f = d / entry["file"]
        if Path(entry["file"]).name != entry["file"]:
            raise ValueError(f"{mpath}: file name {entry['file']!r} must not contain a directory")
        if not f.is_file():
            raise ValueError(f"{d}: layer {entry['layer']}: {entry['file']} is missing")
        if _file_sha256(f) != entry["sha256"]:
            raise ValueError(f"{f}: SHA-256 differs from the manifest (damaged or replaced)")
        key = {"format": m["stats_format"], "fingerprint": m["model_fingerprint"], "layer": entry["layer"],
               "module": entry["module"], "corpus": m["corpus"], "max_tokens": m["tokens"], "dtype": m["dtype"],
               "seed": m["seed"], "max_length": m["max_length"], "dim": m["dim"]}
        try:
            st = read_layer_stats(f, key)
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from None
        if st.count != entry["count"]:
            raise ValueError(f"{f}: counts {st.count} tokens, the manifest says {entry['count']}")
        out[int(entry["layer"])] = st
    return m, out


def import_bundle(bundle_dir: str | os.PathLike, model=None, *, cache_dir: str | os.PathLike | None = None,
                  layers=None) -> dict[int, Path]:
    """Verify a bundle and store its layers in the statistics cache; returns {layer: cache path}.

    With ``model``, its fingerprint and MLP width must be the bundle's. ``layers`` picks a subset.
    Nothing is stored unless every requested layer verifies.
    """
    from pmedit.models import ModelSpec, cache_root
    from pmedit.stats import stats_path

    m, stats = read_bundle(bundle_dir)
    if model is not None:
        spec = ModelSpec.from_model(model)
        if spec.fingerprint != m["model_fingerprint"]:
            raise ValueError(f"{bundle_dir}: statistics of model {m['model_fingerprint']}, this model is "
                             f"{spec.fingerprint} (other weights or dtype: C0 would not describe it)")
        if spec.intermediate_size != m["dim"]:
            raise ValueError(f"{bundle_dir}: d = {m['dim']}, this model's MLP has {spec.intermediate_size}")
    if layers is not None:
        missing = sorted(set(layers) - set(stats))
        if missing:
            raise ValueError(f"{bundle_dir}: no layer(s) {missing} (the bundle has {sorted(stats)})")
        stats = {layer: stats[layer] for layer in layers}
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "stats"
    out = {}
    for layer, st in sorted(stats.items()):
        dest = stats_path(root, {k: st.meta[k] for k in ("fingerprint", "corpus", "layer", "max_tokens", "dtype",
                                                        "seed", "max_length")})
        with atomic_path(dest) as tmp:
            shutil.copyfile(st.path, tmp)
        out[layer] = dest
    return out


# ----------------------------------------------------------------------------------------
# MEMIT / EasyEdit npz files


def import_npz(path: str | os.PathLike, *, dim: int | None = None) -> LayerStats:
    """Read a MEMIT/EasyEdit ``*.npz`` stats file (``mom2.mom2`` = Σ k kᵀ, ``mom2.count``).

    Loaded with ``allow_pickle=False``; their fp32 sum is symmetrised (its halves can differ by
    rounding) and returned as fp64.
    """
    from pmedit.stats import LayerStats

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = {"mom2.mom2", "mom2.count"} - keys
            if missing:
                raise ValueError(f"{path}: not a MEMIT stats file: missing {sorted(missing)} (has {sorted(keys)[:8]})")
            mom2 = z["mom2.mom2"]
            count_arr = z["mom2.count"]
    except OSError as e:
        raise OSError(f"cannot read stats file {str(path)!r}: {e}") from e
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise ValueError(f"{path}: holds object arrays that would need pickle; refusing to load it") from None
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or mom2.dtype.kind != "f":
        raise ValueError(f"{path}: 'mom2.mom2' must be a square float matrix, got {mom2.dtype} {mom2.shape}")
    if dim is not None and mom2.shape[0] != dim:
        raise ValueError(f"{path}: 'mom2.mom2' is {mom2.shape[0]}x{mom2.shape[0]}, the layer needs {dim}x{dim}")
    if count_arr.size != 1 or count_arr.dtype.kind not in "iuf":
        raise ValueError(f"{path}: 'mom2.count' must be one number, got {count_arr.dtype} {count_arr.shape}")
    count = int(count_arr.reshape(-1)[0])
    if count < 1 or count != count_arr.reshape(-1)[0]:
        raise ValueError(f"{path}: 'mom2.count' must be a positive integer, got {count_arr.reshape(-1)[0]}")
    s = torch.from_numpy(np.ascontiguousarray(mom2)).to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{path}: 'mom2.mom2' holds NaN or Inf")
    s = (s + s.T) / 2
    return LayerStats(mean=s / count, count=count, meta={"imported_from": str(path)}, path=path)


def export_npz(stats: LayerStats, path: str | os.PathLike) -> None:
    """Write ``stats`` in the MEMIT/EasyEdit layout (fp64 sum), atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **{"mom2.mom2": stats.sum.cpu().numpy(), "mom2.count": np.int64(stats.count),
                         "mom2.constructor": np.str_("util.runningstats.SecondMoment()"),
                         "constructor": np.str_("util.runningstats.CombinedStat()")})


def import_npz_to_cache(model: nn.Module, tokenizer, layer: int, npz_path: str | os.PathLike, *,
                        corpus="wiki-offline", max_tokens: int = 100_000, cache_dir=None, seed: int = 0,
                        max_length: int | None = None) -> Path:
    """Store an imported npz where ``load_or_collect`` with the same arguments will find it."""
    from pmedit.corpus import resolve_corpus
    from pmedit.models import ModelSpec, cache_root
    from pmedit.stats import _key, _normalize_layers, context_length, save_layer_stats, stats_path

    spec = ModelSpec.from_model(model)
    (layer,) = _normalize_layers(spec, [layer])
    st = import_npz(npz_path, dim=spec.intermediate_size)
    cid = resolve_corpus(corpus).id  # an hf: corpus is not downloaded just to name it
    max_length = int(max_length or context_length(model, tokenizer))
    key = _key(spec, layer, cid, max_tokens, seed, max_length)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "stats"
    path = stats_path(root, key)
    save_layer_stats(path, key, st.sum, st.count, imported_from=str(npz_path))
    return path
