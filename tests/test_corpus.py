"""pmedit.corpus: built-in and file corpora, stable ids, seeded order, clear errors."""
from __future__ import annotations

import importlib.util
import json

import pytest

from pmedit.corpus import Corpus, resolve_corpus


def test_wiki_offline_default():
    c = resolve_corpus()
    assert c.id.startswith("wiki-offline-") and len(c) == 10_033
    assert resolve_corpus("wiki-offline").id == c.id  # stable
    first = next(iter(c))
    assert first.startswith("20th-century classical music is Western art music")


def test_txt_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("First doc line one.\nline two.\n\n\n  Second doc.  \n\n")
    c = resolve_corpus(p)
    assert list(c) == ["First doc line one.\nline two.", "Second doc."]
    moved = tmp_path / "sub"
    moved.mkdir()
    (moved / "a.txt").write_bytes(p.read_bytes())
    assert resolve_corpus(str(moved / "a.txt")).id == c.id  # content, not location
    p.write_text("First doc line one.\n\nSecond doc, edited.")
    assert resolve_corpus(p).id != c.id


def test_jsonl_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"title": "t", "text": "alpha"}) + "\n\n" + json.dumps("beta") + "\n")
    assert list(resolve_corpus(p)) == ["alpha", "beta"]
    q = tmp_path / "e.jsonl"
    q.write_text(json.dumps({"body": "gamma"}) + "\n")
    c = resolve_corpus(q, text_field="body")
    assert list(c) == ["gamma"] and "body" in c.id


def test_iterables_and_seeded_order():
    texts = [f"document number {i}" for i in range(50)]
    c = resolve_corpus(texts)
    assert list(c) == texts
    assert resolve_corpus(iter(texts)).id == c.id  # a generator of the same texts
    assert resolve_corpus(texts[::-1]).id != c.id
    a, b, other = list(c.shuffled(0)), list(c.shuffled(0)), list(c.shuffled(1))
    assert a == b and a != other and sorted(a) == sorted(texts) and a != texts
    assert resolve_corpus(c) is c


@pytest.mark.parametrize(
    "spec, exc, msg",
    [
        ([], ValueError, "empty"),
        (["ok", "fine", 7, "x"], ValueError, "record 2 is a int"),
        (["", "  "], ValueError, "only empty documents"),
        (42, TypeError, "expected a name, a path or an iterable"),
        ({"a": "b"}, TypeError, "dict"),
        (b"bytes", TypeError, "bytes"),
        ("corpus.csv", ValueError, "expected 'wiki-offline'"),
        ("hf:", ValueError, "hf:NAME"),
    ],
)
def test_bad_inputs(spec, exc, msg):
    with pytest.raises(exc, match=msg):
        resolve_corpus(spec)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        resolve_corpus(tmp_path / "missing.txt")
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    with pytest.raises(IsADirectoryError, match="directory"):
        resolve_corpus(d)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        resolve_corpus(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty"):
        resolve_corpus(empty)
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' is a int"):
        resolve_corpus(j)
    j.write_text('{"text": "fine"}\n{"text": "x"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        resolve_corpus(j)
    j.write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: record has no field 'text'"):
        resolve_corpus(j)
    j.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object or string"):
        resolve_corpus(j)


def test_streamed_corpus_checks_records():
    c = Corpus("s", stream=lambda seed: iter(["a", None]))
    with pytest.raises(ValueError, match="record 1 is a NoneType"):
        list(c)
    with pytest.raises(ValueError, match="is empty"):
        list(Corpus("e", stream=lambda seed: iter([])))


def test_hf_needs_datasets():
    if importlib.util.find_spec("datasets") is not None:
        c = resolve_corpus("hf:wikitext:wikitext-2-raw-v1")  # naming it does not download anything
        assert c.id == "hf-wikitext-wikitext-2-raw-v1" and not c.finite
    else:
        with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
            resolve_corpus("hf:wikitext")


def test_shared_jsonl(shared_data):
    c = resolve_corpus(shared_data / "text" / "wiki_vital4_en_summaries.jsonl")
    assert len(c) == 10_033 and c.id.startswith("jsonl-wiki_vital4_en_summaries-")
