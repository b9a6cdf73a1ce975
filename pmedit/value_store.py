"""A persistent store of keys and optimised values, so no record is optimised twice.

A record's keys and values at a layer depend only on the model's weights, the layer, the
context templates, the value settings and the request itself. On unedited weights (the only
case the Editor asks for: a batch of an experiment, every batch size, MEMIT and EMMET alike,
every λ of a sweep, the first batch of a sequence) they are therefore reusable across runs, and
value optimisation is where an edit's time goes. Entries are keyed by a SHA-256 of all of those
(the model by its fingerprint, which hashes every weight byte; the code by a hash of the source
of the modules that compute the entry), so an entry from other weights, other settings or other
code can never be found, let alone used.

On disk a store is a directory of safetensors shards, each written atomically with a checksum
(:func:`pmedit.fileio.save_verified`), and ``index.json`` listing the shards and their entries.
Shards are appended as values are computed; a shard a killed writer finished but did not index
is verified and picked up on the next open, and a shard that fails its checksum is an error that
names it (delete it: its entries are recomputed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pmedit.fileio import atomic_write_json, load_verified, read_json, save_verified

log = logging.getLogger(__name__)

STORE_FORMAT = "pmedit-value-store/1"


# The code that computes an entry is part of its key: a change to value optimisation, key
# extraction or tokenisation (or another torch) must never serve values the old code made.
_CODE = {"keys": ("pmedit.keys", "pmedit.tokens", "pmedit.hooks"),
         "values": ("pmedit.values", "pmedit.value_objectives", "pmedit.values_cached", "pmedit.tokens", "pmedit.hooks")}
_code_digests: dict[str, str] = {}


def code_version(kind: str) -> str:
    """SHA-256 over the source of the modules that compute ``kind`` entries, and torch's version."""
    if kind not in _code_digests:
        import importlib.util

        h = hashlib.sha256(torch.__version__.encode())
        for name in _CODE[kind]:
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin:
                h.update(name.encode() + Path(spec.origin).read_bytes())
        _code_digests[kind] = h.hexdigest()
    return _code_digests[kind]


def entry_key(kind: str, fingerprint: str, layer: int, settings: Mapping[str, Any], templates: Sequence[str],
              request: Any) -> str:
    """The SHA-256 naming one record's ``kind`` ("keys" or "values") entry."""
    payload = {
        "kind": kind, "code": code_version(kind), "model": fingerprint, "layer": int(layer), "settings": dict(settings),
        "templates": list(templates),
        "request": [request.prompt, request.subject, request.target_new],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class ValueStore:
    """``get``/``put`` of per-record tensors by entry key; see the module docstring.

    ``hits`` and ``misses`` count lookups since the store was opened (an experiment's reuse
    factor is lookups / misses).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
        self._shards: dict[str, list[str]] = {}
        self.hits = 0
        self.misses = 0
        self._open()

    # ------------------------------------------------------------------------ reading
    def _open(self) -> None:
        index_path = self.root / "index.json"
        listed: dict[str, list[str]] = {}
        if index_path.is_file():
            index = read_json(index_path, what="value store index")
            if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
                raise ValueError(f"{index_path}: not a {STORE_FORMAT} index")
            listed = {k: list(v) for k, v in index.get("shards", {}).items()}
        on_disk = sorted(p.name for p in self.root.glob("shard-*.safetensors"))
        for name in on_disk:
            self._load_shard(name)
        missing = sorted(set(listed) - set(on_disk))
        if missing:
            log.warning("%s: index lists %d shard(s) that are gone (%s); their entries will be recomputed",
                        self.root, len(missing), ", ".join(missing[:3]))
        if set(on_disk) != set(listed):
            self._write_index()

    def _load_shard(self, name: str) -> None:
        path = self.root / name
        try:
            tensors, meta = load_verified(path, what="value store shard")
        except ValueError as e:
            raise ValueError(f"{e}; delete {path} to recompute its entries") from None
        entries = meta.get("entries", [])
        for key in entries:
            fields = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.split(".", 1)[0] == key}
            self._where[key] = (name, fields)
        self._shards[name] = list(entries)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get_many(self, keys: Sequence[str]) -> list[dict[str, torch.Tensor] | None]:
        out = [self._where[k][1] if k in self._where else None for k in keys]
        n_hit = sum(x is not None for x in out)
        self.hits += n_hit
        self.misses += len(out) - n_hit
        return out

    # ------------------------------------------------------------------------ writing
    def put_many(self, entries: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Append ``{key: {field: tensor}}`` as one new shard (entries already stored are skipped)."""
        new = {k: v for k, v in entries.items() if k not in self._where}
        if not new:
            return
        tensors = {f"{k}.{f}": t.detach().to("cpu").contiguous() for k, fields in new.items() for f, t in fields.items()}
        name = f"shard-{len(self._shards):06d}-{os.getpid()}-{hashlib.sha256(''.join(sorted(new)).encode()).hexdigest()[:8]}.safetensors"
        save_verified(self.root / name, tensors, {"format": STORE_FORMAT, "entries": sorted(new)})
        for k, fields in new.items():
            self._where[k] = (name, {f: t.detach().to("cpu") for f, t in fields.items()})
        self._shards[name] = sorted(new)
        self._write_index()

    def _write_index(self) -> None:
        atomic_write_json(self.root / "index.json", {"format": STORE_FORMAT, "shards": self._shards}, indent=None)

    def reuse_factor(self) -> float:
        """Lookups per computed entry since opening (1.0: nothing reused)."""
        looked = self.hits + self.misses
        return looked / self.misses if self.misses else (float("inf") if looked else 1.0)
