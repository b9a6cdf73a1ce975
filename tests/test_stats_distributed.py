"""pmedit.stats_distributed: 2 gloo processes (started here, time-bounded) against one process.

Each rank is tests/stats_dist_worker.py on a tiny seeded Llama (no download), one thread each.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmedit import stats as S
from pmedit import stats_distributed as D
from pmedit.models import ModelSpec

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

WORKER = Path(__file__).with_name("stats_dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
import stats_dist_worker as W  # noqa: E402

BASE = {"tokens": 3000, "batch_tokens": 200, "checkpoint_tokens": 300, "layers": [0, 2]}
TIMEOUT = 240  # seconds for a whole multi-process run on 2 shared cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, world: int = 2, **cfg) -> tuple[list[int], list[dict]]:
    out = tmp_path / f"out{_free_port()}"
    out.mkdir()
    cfg = {**BASE, "cache": str(tmp_path / "cache"), "out": str(out), **cfg}
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    port = _free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(cfg_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes, logs = [], []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for r in range(world):
        f = out / f"rank{r}.json"
        res = json.loads(f.read_text()) if f.exists() else {}
        results.append({**res, "log": logs[r][-3000:]})  # the log names an abort after the result
    return codes, results


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").rglob("*.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, same model, tokens and arguments, through the ordinary cache."""
    cache = tmp_path_factory.mktemp("single")
    stats = S.load_or_collect(W.model(), W.CharTokenizer(), BASE["layers"], corpus=W.texts(400),
                              max_tokens=BASE["tokens"], cache_dir=cache, progress=False,
                              batch_tokens=BASE["batch_tokens"])
    return stats


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_shards_are_deterministic_disjoint_and_balanced():
    plan = S.plan_batches(W.CharTokenizer(), __import__("pmedit.corpus").corpus.resolve_corpus(W.texts(400)),
                          max_tokens=3000, batch_tokens=200, max_length=48)
    for world in (1, 2, 3, 5):
        shards = D.shard_batches(plan, world)
        assert shards == D.shard_batches(plan, world)
        assert sorted(b for s in shards for b in s) == list(range(len(plan.batches)))
        loads = [sum(len(plan.batches[b]) * max(map(len, plan.batches[b])) for b in s) for s in shards]
        assert max(loads) - min(loads) <= 200, loads  # within one batch


def test_two_ranks_equal_one_process_and_write_its_cache(tmp_path, single):
    codes, res = _run(tmp_path)
    assert codes == [0, 0], res
    files = _cache_files(tmp_path)
    assert [f.name for f in files] == sorted(st.path.name for st in single.values())  # same keys, same names
    assert not list((tmp_path / "cache").rglob("*.ranks"))  # rank checkpoints removed after success
    for layer, st in single.items():
        got = S.read_layer_stats(next(f for f in files if f.name == st.path.name))
        assert got.count == st.count == BASE["tokens"]
        assert _rel(got.sum, st.sum) < 1e-12, _rel(got.sum, st.sum)
        key = S._key(ModelSpec.from_model(W.model()), layer, st.meta["corpus"], BASE["tokens"], 0, 48)
        assert {k: got.meta[k] for k in key} == key and got.meta["world_size"] == 2
        for r in res:  # every rank returned the reduced sums
            assert r["counts"][str(layer)] == BASE["tokens"]
            assert abs(r["sum_of_sums"][str(layer)] - float(st.sum.sum())) <= 1e-10 * float(st.sum.abs().sum())
    # the single-process loader serves the distributed files as they are (no recomputation)
    again = S.load_or_collect(W.model(), W.CharTokenizer(), BASE["layers"], corpus=W.texts(400),
                              max_tokens=BASE["tokens"], cache_dir=tmp_path / "cache", progress=False,
                              batch_tokens=BASE["batch_tokens"])
    assert all(again[k].meta.get("world_size") == 2 for k in again)


def test_bounded_mode_and_host_reduce_give_the_same_sums(tmp_path, single):
    codes, res = _run(tmp_path, layers_per_pass=1, reduce="host")
    assert codes == [0, 0], res
    for st in single.values():
        got = S.read_layer_stats(next(f for f in _cache_files(tmp_path) if f.name == st.path.name))
        assert _rel(got.sum, st.sum) < 1e-12
    assert res[0]["forward_calls"] > 0


def test_killed_rank_resumes_and_other_world_size_is_refused(tmp_path, single):
    codes, res = _run(tmp_path, kill_rank=1, kill_after=4)
    assert codes[1] == -9, res
    assert codes[0] != 0 and res[0]["type"] == "RankFailure", res[0]
    assert "lost contact" in res[0]["error"] and "resumes from the rank checkpoints" in res[0]["error"]
    assert not [f for f in _cache_files(tmp_path) if ".ranks" not in str(f)]  # no cache file written
    ckpts = sorted(p.name for p in (tmp_path / "cache").rglob("rank*-of-*.safetensors"))
    assert ckpts == ["rank0000-of-0002.safetensors", "rank0001-of-0002.safetensors"]
    codes, res = _run(tmp_path, world=1)  # the shares of 1 and 2 ranks differ: refused
    assert codes == [3] and res[0]["type"] == "ValueError", res
    assert "run with 2 processes; this run has 1" in res[0]["error"] and res[0].get("forward_calls", 0) == 0
    codes, res = _run(tmp_path)
    assert codes == [0, 0], res
    # rank 1 resumed after its last checkpoint (> 2 of its batches done), rank 0 had finished its share
    assert res[0]["forward_calls"] == 0 and 0 < res[1]["forward_calls"] < 8, res
    for st in single.values():
        got = S.read_layer_stats(next(f for f in _cache_files(tmp_path) if f.name == st.path.name))
        assert got.count == st.count and _rel(got.sum, st.sum) < 1e-12


@pytest.mark.parametrize("fault, culprit", [
    ({"layers_rank1": [0, 1]}, "ranks disagree on layers (rank 0: [0, 2], rank 1: [0, 1])"),
    ({"model_seed_rank1": 1}, "ranks disagree on model fingerprint"),
    ({"texts": 3}, "gives 1 batches of ≤ 200 tokens"),
])
def test_mismatch_and_short_corpus_fail_on_every_rank_before_work(tmp_path, fault, culprit):
    codes, res = _run(tmp_path, **fault)
    assert codes == [3, 3], res
    for r in res:
        assert r["type"] == "ValueError" and culprit in r["error"], r
        assert r.get("forward_calls", 0) == 0
    assert not _cache_files(tmp_path)


def test_exception_on_one_rank_is_reported_on_every_rank(tmp_path):
    codes, res = _run(tmp_path, raise_rank=1)
    assert codes == [3, 3], res
    assert res[1]["type"] == "FloatingPointError"
    assert res[0]["type"] == "RankFailure" and "rank 1: FloatingPointError: injected failure" in res[0]["error"]
    assert not [f for f in _cache_files(tmp_path) if ".ranks" not in str(f)]


def test_library_without_process_group_is_load_or_collect(tmp_path, single):
    got = D.load_or_collect_distributed(W.model(), W.CharTokenizer(), BASE["layers"], corpus=W.texts(400),
                                        max_tokens=BASE["tokens"], cache_dir=tmp_path, progress=False,
                                        batch_tokens=BASE["batch_tokens"])
    for layer, st in single.items():
        assert torch.equal(got[layer].mean, st.mean)
    with pytest.raises(RuntimeError, match="torchrun"):
        D.collect_distributed(W.model(), W.CharTokenizer(), [0], W.texts(10), max_tokens=100)
