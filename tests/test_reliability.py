"""Issue 14 (what hostile testing found): killed writers, changed weights, absurd settings, and
every CLI failure as one line naming the culprit with exit code 2 and no temp file left.

Request validation (items 4, 5, 10, 11, 12) is in tests/test_requests.py, the fingerprint's
bit-level checks (item 9) in tests/test_models.py.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import make_tiny_llama
from pmedit import cli
from pmedit import models as M
from pmedit import stats as S
from pmedit.hparams import EditHparams

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

TEXTS = [f"Document {i}: the {w} of the river runs north past the old mill." for i, w in
         enumerate(["water", "colour", "sound", "length", "name", "bank", "bridge", "mouth"] * 4)]


@pytest.fixture(scope="module")
def tiny(smollm2):
    """A random Llama with SmolLM2's vocabulary (so its tokenizer fits) and the tokenizer."""
    return make_tiny_llama(vocab=49152, layers=3), smollm2[1]


def _collect(model, tok, cache, layers=(0,)):
    return S.load_or_collect(model, tok, list(layers), corpus=TEXTS, max_tokens=200, cache_dir=cache,
                             batch_tokens=128, progress=False)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = S.collect_second_moments

    def wrapped(*a, **k):
        calls.append(list(a[2]))
        return real(*a, **k)

    monkeypatch.setattr(S, "collect_second_moments", wrapped)
    return calls


# ------------------------------------------------------------------ item 8: killed writers

_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pmedit.fileio import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(b"half of a statistics file" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)  # no finally runs
    """
)


def _kill_a_writer_of(path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _temps(root):
    return sorted(p.name for p in root.rglob(".*.tmp*"))


def test_killed_writer_of_a_final_statistics_file_is_cleaned_up(tiny, tmp_path, spy):
    """A writer SIGKILLed while saving a final C0 file leaves a temp as large as the file; the
    next load_or_collect of that model removes it, also when it finds the file cached (before,
    only the next write of the very same path did, so a cache hit kept it forever)."""
    model, tok = tiny
    first = _collect(model, tok, tmp_path)[0]
    assert spy == [[0]]
    final = first.path
    sibling = final.parent / final.name.replace("__L000__", "__L002__")  # another layer, never written
    _kill_a_writer_of(final)
    _kill_a_writer_of(sibling)
    assert len(_temps(tmp_path)) == 2  # the killed writers' temp files are there
    live = final.parent / f".{final.name}.{os.getpid()}.abcdefgh.tmp"
    live.write_bytes(b"a live writer's file")  # a writer that still runs keeps its temp
    again = _collect(model, tok, tmp_path)[0]
    assert spy == [[0]]  # served from the cache ...
    assert _temps(tmp_path) == [live.name]  # ... and the dead writers' temps are gone
    assert torch.equal(again.mean, first.mean)
    live.unlink()
    _kill_a_writer_of(final)
    final.unlink()  # the killed write was the only one: the next collect writes the file
    _collect(model, tok, tmp_path)
    assert spy == [[0], [0]] and _temps(tmp_path) == [] and final.is_file()


# --------------------------------------------------- item 9: statistics of a changed model

def test_statistics_are_not_reused_for_a_sparsely_changed_model(tiny, tmp_path, spy):
    model, tok = tiny
    clean = _collect(model, tok, tmp_path)[0]
    w = model.lm_head.weight  # [49152, 64]: the old fingerprint sampled one row in 768
    saved = w.data[5].clone()
    try:
        w.data[5] = float("nan")  # a NaN row in a weight the statistics of layer 0 never see
        changed = _collect(model, tok, tmp_path)[0]
        assert spy == [[0], [0]]  # collected again, into another fingerprint's directory
        assert changed.path != clean.path and changed.path.parent != clean.path.parent
    finally:
        w.data[5] = saved
    assert _collect(model, tok, tmp_path)[0].path == clean.path and spy == [[0], [0]]


def test_deltas_do_not_load_onto_a_sparsely_changed_model(tmp_path):
    # the synthetic editor of tests/test_editor.py: seeded keys and values, no tokenizer
    from test_editor import Synthetic, _requests, _tiny_editor

    from pmedit.editor import Editor

    ed = _tiny_editor(make_tiny_llama(seed=1), Synthetic())
    ed.edit(_requests(2))
    path = ed.save_deltas(tmp_path / "d.safetensors")
    other = make_tiny_llama(seed=1)
    other.lm_head.weight.data[5, 3] += 1e-3  # one element, where the old sampled fingerprint never looked
    with pytest.raises(ValueError, match="fingerprint"):
        Editor.load_deltas(other, path)
    Editor.load_deltas(make_tiny_llama(seed=1), path)  # the unchanged model takes them


# --------------------------------------------------------------- item 11: absurd λ and λₑ

@pytest.mark.parametrize(
    "fields, words",
    [
        ({"lam": 1e300}, "field 'lam': 1e+300 is outside"),
        ({"lam": 1e-9}, "field 'lam': 1e-09 is outside"),
        ({"lam_e": 1e300}, "field 'lam_e': 1e+300 is above"),
        ({"lam": 1e6, "lam_e": 10.0}, "lam·lam_e = 1e+07 is above"),
    ],
)
def test_absurd_lambdas_are_refused(fields, words):
    with pytest.raises(ValueError) as e:
        EditHparams(layers=[4], method="emmet", **fields)
    assert words in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="h.json.*|lam"):
        EditHparams.from_dict({"layers": [4], **fields}, source="h.json")


def test_lambdas_in_use_are_accepted():
    assert EditHparams(layers=[4], method="memit", lam=15000.0).lam == 15000.0  # MEMIT's setting
    for lam_e in (0.0, 0.01, 0.1, 10.0):  # the λₑ sweep
        assert EditHparams(layers=[4], lam=100.0, lam_e=lam_e).lam_e == lam_e
    assert EditHparams.preset("smollm2").lam == 100.0


# ------------------------------------------------- item 6: every CLI failure is one line

def _fail(capsys, argv, *words):
    """Run the CLI, expect exit code 2 and exactly one stderr line holding ``words``."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pmedit {argv[0]}: error: "), err
    for w in words:
        assert w in lines[0], err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """These failures must come before the model loads."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(M, "load_model", refuse)


def test_edit_input_errors_come_before_the_model_loads(capsys, tmp_path, no_model_load):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('[{"prompt": "{} is", "subject": "Caf\xe9", "target_new": "x"}]'.encode("latin-1"))
    _fail(capsys, ["edit", str(bad)], str(bad), "not UTF-8")
    _fail(capsys, ["edit", str(tmp_path / "missing.json")], "missing.json", "does not exist")
    _fail(capsys, ["edit", "--dtype", "int8"], "dtype 'int8'")
    _fail(capsys, ["edit", "--batch-size", "0"], "--batch-size must be >= 1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _fail(capsys, ["edit", str(empty)], str(empty), "holds no requests")
    surrogate = tmp_path / "surrogate.json"
    surrogate.write_text(json.dumps([{"prompt": "{} is", "subject": "A\ud800B", "target_new": "x"}]))
    _fail(capsys, ["edit", str(surrogate)], str(surrogate), "request 0", "field 'subject'", "lone surrogate")
    conflict = tmp_path / "conflict.jsonl"
    conflict.write_text('{"prompt": "{} is in", "subject": "Paris", "target_new": "Spain"}\n'
                        '{"prompt": "{} is in", "subject": "Paris", "target_new": "Peru"}\n')
    _fail(capsys, ["edit", str(conflict)], "request 1", "conflicts with request 0")
    afile = tmp_path / "a-file"
    afile.write_text("")
    _fail(capsys, ["edit", "--save-deltas", str(afile / "d.safetensors")], "--save-deltas", str(afile))
    hp = tmp_path / "h.yaml"
    hp.write_text("layers: [4]\nlam: 1.0e+300\n")
    _fail(capsys, ["edit", "--hparams", str(hp)], "'lam'", "outside")
    assert _temps(tmp_path) == []


def test_edit_model_errors(capsys, tmp_path, monkeypatch, smollm2):
    _fail(capsys, ["edit", "--model", str(tmp_path / "no" / "such" / "path"), "--layers", "1"],
          str(tmp_path / "no" / "such" / "path"), "no such file")
    tiny = make_tiny_llama(vocab=49152, layers=3)
    tiny.model.layers[1].mlp.down_proj.weight.data[3, 7] = float("inf")
    monkeypatch.setattr(M, "load_model", lambda *a, **k: (tiny, smollm2[1]))
    _fail(capsys, ["edit", "--model", "tiny", "--layers", "1", "--no-progress"],
          "model weight model.layers.1.mlp.down_proj.weight holds 1 non-finite value(s) (first at [3, 7]: inf)")


def test_stats_errors(capsys, tmp_path, monkeypatch, smollm2):
    afile = tmp_path / "a-file"
    afile.write_text("")
    monkeypatch.setattr(M, "load_model", lambda *a, **k: smollm2)
    _fail(capsys, ["stats", "--layers", "0", "--cache-dir", str(afile)], "statistics cache", str(afile),
          "not a writable directory")
    _fail(capsys, ["stats", "--layers", "0", "--tokens", "0"], "--tokens must be >= 1")
    _fail(capsys, ["stats", "--layers", "0", "--dtype", "int8"], "dtype 'int8'")
    _fail(capsys, ["stats", "--layers", "0", "--import-npz", str(tmp_path / "none.npz")], "none.npz")
    _fail(capsys, ["stats", "--layers", "0", "--corpus", str(tmp_path / "none.txt")], "none.txt")

    # The disk fills up while the statistics file is written: half a file, then ENOSPC.
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    cache = tmp_path / "cache"
    line = _fail(capsys, ["stats", "--layers", "0", "--tokens", "64", "--cache-dir", str(cache), "--no-progress"],
                 "No space left on device")
    assert str(cache) in line
    assert _temps(tmp_path) == []  # the half-written file went with the error
    assert not list(cache.rglob("*.safetensors"))


def test_interrupt_is_one_line(capsys, monkeypatch):
    from pmedit.commands import experiment

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run", interrupted)
    assert cli.main(["experiment", "batch", "--config", "x.json"]) == 130
    assert capsys.readouterr().err == "pmedit experiment: interrupted\n"


def test_bad_arguments_are_one_line(capsys):
    for argv, words in [(["edit", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
                        (["experiment"], "required: name"),
                        (["stats", "--layers", "5-2"], "bad layer list '5-2'")]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"pmedit {argv[0]}: error: ") and words in err, err


_FSIZE_LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    limit = int(sys.argv.pop(1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from pmedit.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_stats_on_a_disk_that_refuses_the_file(tmp_path, smollm2):
    """A real kernel refusal (RLIMIT_FSIZE: every file is capped at 16 KiB, like a nearly full
    disk), not a simulated one: one line naming the cache, exit code 2, no temp file left."""
    model_dir = tmp_path / "model"
    make_tiny_llama(vocab=49152, layers=2).save_pretrained(model_dir)
    smollm2[1].save_pretrained(model_dir)
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _FSIZE_LIMITED, str(16 * 1024), "stats", "--model", str(model_dir),
                           "--layers", "0", "--tokens", "64", "--cache-dir", str(cache), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("pmedit stats: error: ") and "File too large" in last and str(cache) in last, last
    assert _temps(tmp_path) == [] and not list(cache.rglob("*.safetensors"))
