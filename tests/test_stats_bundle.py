"""Statistics bundles (pmedit stats --export/--import), bounded mode in one process, and
``torchrun -m pmedit stats`` with 2 gloo processes against one process."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmedit import stats as S
from pmedit import stats_distributed as D

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats_dist_worker as W  # noqa: E402

KW = dict(corpus=W.texts(200), max_tokens=1200, progress=False, batch_tokens=200)


@pytest.fixture(scope="module")
def tiny():
    return W.model(), W.CharTokenizer()


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, S.load_or_collect(*tiny, [0, 1, 2], cache_dir=cache, **KW)


def test_bundle_round_trip_into_another_cache(tiny, cached, tmp_path):
    model, tok = tiny
    _, stats = cached
    out = S.export_bundle(stats, tmp_path / "bundle")
    m = json.loads((out / "manifest.json").read_text())
    assert m["model_fingerprint"] == stats[0].meta["fingerprint"] and m["tokens"] == 1200
    assert [e["layer"] for e in m["layers"]] == [0, 1, 2] and m["dtype"] == "float32"
    assert {"corpus", "pmedit", "manifest_sha256", "seed", "max_length"} <= set(m)
    laptop = tmp_path / "laptop"
    paths = S.import_bundle(out, model, cache_dir=laptop, layers=[0, 2])
    assert sorted(paths) == [0, 2]
    got = S.load_or_collect(model, tok, [0, 2], cache_dir=laptop, **{**KW, "corpus": W.texts(200)})
    for layer in (0, 2):
        assert torch.equal(got[layer].mean, stats[layer].mean) and got[layer].path == paths[layer]


def _damage(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-9] ^= 1
    path.write_bytes(bytes(raw))


def test_bad_bundles_are_refused_before_anything_is_stored(tiny, cached, tmp_path, monkeypatch):
    model, _ = tiny
    _, stats = cached
    good = S.export_bundle(stats, tmp_path / "good")
    laptop = tmp_path / "laptop"

    def variant(name, change):
        d = tmp_path / name
        shutil.copytree(good, d)
        change(d)
        return d

    cases = {
        "flipped bit": (variant("bit", lambda d: _damage(d / "layer001.safetensors")), "SHA-256 differs"),
        "no manifest": (variant("nomani", lambda d: (d / "manifest.json").unlink()), "no manifest.json"),
        "missing file": (variant("nofile", lambda d: (d / "layer002.safetensors").unlink()), "layer002.safetensors is missing"),
        "edited manifest": (variant("edit", lambda d: (d / "manifest.json").write_text(
            (d / "manifest.json").read_text().replace('"tokens": 1200', '"tokens": 1300'))), "manifest checksum mismatch"),
    }
    for what, (d, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            S.import_bundle(d, model, cache_dir=laptop)
        assert not laptop.exists(), what  # nothing stored
    with pytest.raises(ValueError, match="statistics of model .* this model is"):
        S.import_bundle(good, W.model(seed=1), cache_dir=laptop)
    with pytest.raises(ValueError, match=r"no layer\(s\) \[5\]"):
        S.import_bundle(good, model, cache_dir=laptop, layers=[5])
    assert not laptop.exists()
    # bad input to an export is refused before the old bundle is touched
    stats2 = dict(stats)
    stats2[1] = S.LayerStats(mean=stats[1].mean, count=stats[1].count, layer=1, meta=stats[1].meta, path=tmp_path / "gone")
    with pytest.raises(ValueError, match="layer 1 has no statistics file"):
        S.export_bundle(stats2, good)
    S.read_bundle(good)
    # an export that dies half-way leaves no manifest, so the half-written bundle is refused
    import pmedit.stats_bundle as B

    real, calls = B.shutil.copyfile, []

    def dying_copy(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(B.shutil, "copyfile", dying_copy)
    with pytest.raises(OSError, match="No space"):
        S.export_bundle(stats, good)
    monkeypatch.setattr(B.shutil, "copyfile", real)
    with pytest.raises(ValueError, match="no manifest.json"):
        S.import_bundle(good, model, cache_dir=laptop)
    assert not laptop.exists() and not [p for p in good.iterdir() if p.name.startswith(".")]  # no temp left


def test_bounded_mode_in_one_process_writes_the_same_files(tiny, cached, tmp_path):
    model, tok = tiny
    _, stats = cached
    got = D.load_or_collect_distributed(model, tok, [0, 1, 2], cache_dir=tmp_path, layers_per_pass=2, **KW)
    for layer in (0, 1, 2):
        assert got[layer].path.name == stats[layer].path.name
        assert float((got[layer].sum - stats[layer].sum).abs().max() / stats[layer].sum.abs().max()) < 1e-12
    assert not list(tmp_path.rglob("*.ranks"))


def test_cli_export_import(smollm2, tmp_path, monkeypatch, capsys):
    from pmedit import cli, models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm2)
    cache = tmp_path / "cache"
    rc = cli.main(["stats", "--layers", "0-1", "--tokens", "150", "--batch-tokens", "256", "--cache-dir", str(cache),
                   "--export", str(tmp_path / "b"), "--no-progress"])
    assert rc == 0 and "bundle:" in capsys.readouterr().out
    rc = cli.main(["stats", "--import", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c2")])
    out = capsys.readouterr().out
    assert rc == 0 and "imported layer 0" in out and "imported layer 1" in out and "mom2_tokens=150" in out
    assert cli.main(["stats", "--import", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert cli.main(["stats", "--tokens", "10"]) == 2 and "--layers is required" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_cli_two_processes_equal_one(smollm2, tmp_path):
    """The README's command line, 2 gloo processes on this CPU, against the single-process cache."""
    model, tok = smollm2
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "pmedit", "stats", "--layers", "0,3", "--tokens", "400", "--batch-tokens", "128", "--cache-dir",
           str(cache), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 processes)" in proc.stdout and proc.stdout.count("layer   0: 400 tokens") == 1  # rank 0 prints
    one = S.load_or_collect(model, tok, [0, 3], max_tokens=400, batch_tokens=128, cache_dir=tmp_path / "one",
                            progress=False)
    for layer, st in one.items():
        got = S.read_layer_stats(cache / st.path.relative_to(tmp_path / "one"))
        assert got.count == 400 and got.meta["world_size"] == 2
        assert float((got.sum - st.sum).abs().max() / st.sum.abs().max()) < 1e-12
