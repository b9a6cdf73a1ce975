"""pmedit.stats: C0 statistics against a naive fp64 reference, the cache, resume, npz import.

Budgets are a few thousand tokens on the shallow layers of SmolLM2 so the file runs in well
under a minute on 2 shared cores.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from pmedit import stats as S
from pmedit.corpus import resolve_corpus
from pmedit.hooks import run_until
from pmedit.models import LayerIndexError, ModelSpec
from pmedit.tokens import pad_batch


pytestmark = pytest.mark.usefixtures("one_intraop_thread")

LAYERS = [0, 2]
TOKENS = 600
BATCH = 256  # packs the 600 tokens as [158], [142], [107, 88], [72, 33]: two padded batches
# checkpointed runs: a checkpoint every CKPT tokens, so ~6 in a run
CKPT = 100


class CharTokenizer:
    """Enough of a HF tokenizer for pmedit.stats: one id per character, no download needed."""

    pad_token_id = 0
    eos_token_id = 0
    model_max_length = 48

    def __call__(self, texts, add_special_tokens=True, truncation=True, max_length=None):
        return {"input_ids": [[1 + ord(c) % 120 for c in t][:max_length] for t in texts]}


def _random_texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "pi", "omega", "x", "tau"]
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 14, (1,), generator=g))
        out.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama_against_naive_fp64(dtype, tmp_path):
    """No download: a random Llama with odd sizes, a char tokenizer, heavily padded batches."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(hidden=40, intermediate=72, layers=3, vocab=128).to(dtype)
    tok = CharTokenizer()
    texts = _random_texts(60)
    spec = ModelSpec.from_model(model)
    plan = S.plan_batches(tok, resolve_corpus(texts), max_tokens=900, batch_tokens=100, max_length=48, seed=3)
    assert sum(len(b) * max(map(len, b)) for b in plan.batches) > plan.tokens  # padding present
    got = S.collect_second_moments(model, tok, [2, 0], texts, max_tokens=900, batch_tokens=100, seed=3,
                                   progress=False)
    assert sorted(got) == [0, 2]
    for layer in (0, 2):
        assert got[layer].count == plan.tokens == 900
        single = S.collect_second_moments(model, tok, [layer], texts, max_tokens=900, batch_tokens=100, seed=3,
                                          progress=False)[layer]
        assert torch.equal(single.sum(), got[layer].sum())
        ref = _naive(model, spec, plan, layer)
        # fp32: batched vs per-document GEMMs round k differently at ~1e-7, sums of ≤900 rows
        # in fp32 add ~1e-6. bf16: k itself is rounded to 8 bits, and a padded batch and a
        # single document may round differently, ~4e-3 per element but averaging out in the
        # sum; 2e-2 still catches a lost/extra token or a padding row (≥ 1e-1 here).
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        assert _rel(got[layer].sum(), ref) < tol, _rel(got[layer].sum(), ref)
    stats = S.load_or_collect(model, tok, [0, 2], corpus=texts, max_tokens=900, cache_dir=tmp_path,
                              batch_tokens=100, seed=3, progress=False)
    assert stats[2].meta["dtype"] == str(dtype).replace("torch.", "") and stats[2].mean.dtype == torch.float64
    assert torch.equal(stats[2].mean, got[2].mean()) and stats[2].count == 900


@pytest.fixture(scope="module")
def text_corpus(shared_data):
    return resolve_corpus(shared_data / "text" / "wiki_vital4_en_summaries.jsonl")


@pytest.fixture(scope="module")
def plan(smollm2, text_corpus):
    model, tok = smollm2
    return S.plan_batches(tok, text_corpus, max_tokens=TOKENS, batch_tokens=BATCH,
                          max_length=S.context_length(model, tok), seed=0)


@pytest.fixture(scope="module")
def collected(smollm2, text_corpus):
    model, tok = smollm2
    return S.collect_second_moments(model, tok, LAYERS, text_corpus, max_tokens=TOKENS, batch_tokens=BATCH,
                                    progress=False)


@pytest.fixture(scope="module")
def checkpointed(smollm2, text_corpus, tmp_path_factory):
    """An uninterrupted run with the checkpoint schedule that the resume tests use."""
    model, tok = smollm2
    ckpt = tmp_path_factory.mktemp("ckpt") / "fresh.safetensors"
    return S.collect_second_moments(model, tok, LAYERS, text_corpus, max_tokens=TOKENS, batch_tokens=BATCH,
                                    checkpoint=ckpt, checkpoint_tokens=CKPT, progress=False)


def _naive(model, spec, plan, layer, *, include_padding_of=None):
    """Σ k kᵀ in fp64, one unpadded document at a time (no batching, no masks)."""
    name = spec.down_proj_name(layer)
    s = torch.zeros(spec.intermediate_size, spec.intermediate_size, dtype=torch.float64)
    with torch.no_grad():
        for batch in plan.batches:
            for doc in batch:
                k = run_until(model, name, torch.tensor([doc])).inputs[name][0].double()
                s += k.T @ k
    return s


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_plan_is_exact_deterministic_and_packed(smollm2, text_corpus, plan):
    model, tok = smollm2
    assert plan.tokens == TOKENS == sum(len(d) for b in plan.batches for d in b)
    widths = [max(len(d) for d in b) for b in plan.batches]
    assert widths == sorted(widths, reverse=True)  # longest first
    for b, w in zip(plan.batches, widths):
        assert len(b) * w <= BATCH or len(b) == 1
    assert any(len({len(d) for d in b}) > 1 for b in plan.batches)  # so some rows are padded
    again = S.plan_batches(tok, text_corpus, max_tokens=TOKENS, batch_tokens=BATCH, max_length=plan.max_length, seed=0)
    other = S.plan_batches(tok, text_corpus, max_tokens=TOKENS, batch_tokens=BATCH, max_length=plan.max_length, seed=1)
    assert again.digest == plan.digest and again.batches == plan.batches
    assert other.digest != plan.digest
    short = S.plan_batches(tok, text_corpus, max_tokens=TOKENS, batch_tokens=BATCH, max_length=16, seed=0)
    assert max(len(d) for b in short.batches for d in b) == 16  # truncated to the context length


def test_one_pass_equals_per_layer_equals_naive_fp64(smollm2, plan, collected):
    model, tok = smollm2
    spec = ModelSpec.from_model(model)
    for layer in LAYERS:
        sm = collected[layer]
        assert sm.count == TOKENS
        # Layers below the stop point compute the same ops whether or not deeper layers are
        # traced, so the per-layer run is bit-identical to the multi-layer one.
        single = S.collect_second_moments(model, tok, [layer], plan_corpus(smollm2), max_tokens=TOKENS,
                                          batch_tokens=BATCH, progress=False)[layer]
        assert torch.equal(single.sum(), sm.sum())
        ref = _naive(model, spec, plan, layer)
        # fp32 forward in padded batches vs one document at a time (GEMM shapes change the fp32
        # rounding of k, ~1e-6 relative) plus fp32 chunk sums of ≤600 rows (≤ ~1e-6): 2e-5 is
        # an order of magnitude above both and far below any real error (a lost or extra token
        # moves entries by ~1e-3 relative).
        assert _rel(sm.sum(), ref) < 2e-5, _rel(sm.sum(), ref)


def plan_corpus(smollm2):
    """The same corpus object identity is not needed: resolve again (content-derived id)."""
    from conftest import SHARED_DATA

    return resolve_corpus(SHARED_DATA / "text" / "wiki_vital4_en_summaries.jsonl")


def test_padding_is_excluded(smollm2, plan, collected):
    """Counting padded rows would change the sum; the collected one matches the unpadded reference."""
    model, tok = smollm2
    spec = ModelSpec.from_model(model)
    layer = LAYERS[-1]
    name = spec.down_proj_name(layer)
    with_pad = torch.zeros(spec.intermediate_size, spec.intermediate_size, dtype=torch.float64)
    n_rows = 0
    with torch.no_grad():
        for batch in plan.batches:
            ids, _ = pad_batch(batch, tok.pad_token_id, "cpu")
            k = run_until(model, name, ids).inputs[name].reshape(-1, spec.intermediate_size).double()
            with_pad += k.T @ k
            n_rows += k.shape[0]
    assert n_rows > TOKENS  # the plan has padding to exclude
    ref = _naive(model, spec, plan, layer)
    assert _rel(with_pad, ref) > 1e-3  # so the check below can fail
    assert _rel(collected[layer].sum(), ref) < 2e-5


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # as the parent test process, so both runs round alike
    import pmedit.stats as S
    from pmedit.models import load_model, ModelSpec
    ckpt, corpus = sys.argv[1], sys.argv[2]
    written = []
    orig = S._write_checkpoint
    def counting(*a, **k):
        orig(*a, **k)
        written.append(1)
    S._write_checkpoint = counting
    model, tok = load_model()
    spec = ModelSpec.from_model(model)
    def kill_mid_batch(*a):
        if len(written) >= 2:  # in the forward pass of the batch after the 2nd checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
    spec.layer(model, 1).register_forward_hook(kill_mid_batch)
    S.collect_second_moments(model, tok, [0, 2], corpus, max_tokens=int(sys.argv[3]), batch_tokens=int(sys.argv[4]),
                             checkpoint=ckpt, checkpoint_tokens=int(sys.argv[5]), progress=False)
    print("NOT KILLED")
    """
)


def test_killed_run_resumes_to_identical_result(smollm2, tmp_path, shared_data, checkpointed):
    model, tok = smollm2
    corpus = str(shared_data / "text" / "wiki_vital4_en_summaries.jsonl")
    ckpt = tmp_path / "run.checkpoint.safetensors"
    args = [str(ckpt), corpus, str(TOKENS), str(BATCH), str(CKPT)]
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *args], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "NOT KILLED" not in proc.stdout
    _, meta = S._verified_load(ckpt)
    assert 0 < meta["tokens_done"] < TOKENS and meta["batches_done"] >= 2
    # a temp file as a writer killed mid-save leaves it (pid 2**22 + 1 is above Linux's pid_max)
    stale = tmp_path / f".{ckpt.name}.{2**22 + 1}.abc.tmp"
    stale.write_bytes(b"partial")
    live = tmp_path / f".{ckpt.name}.{os.getpid()}.abc.tmp"
    live.write_bytes(b"being written")
    resumed = S.collect_second_moments(model, tok, LAYERS, corpus, max_tokens=TOKENS, batch_tokens=BATCH,
                                       checkpoint=ckpt, checkpoint_tokens=CKPT, progress=False)
    assert not stale.exists() and live.exists()
    for layer in LAYERS:
        assert resumed[layer].count == checkpointed[layer].count == TOKENS  # nothing lost, nothing twice
        assert torch.equal(resumed[layer].sum(), checkpointed[layer].sum())


def test_crash_while_writing_a_checkpoint(smollm2, tmp_path, text_corpus, monkeypatch, checkpointed, collected):
    """A failure between writing the temp file and renaming it leaves the previous checkpoint."""
    model, tok = smollm2
    ckpt = tmp_path / "c.safetensors"
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("simulated crash during rename")
        return real_replace(src, dst)

    monkeypatch.setattr(S.os, "replace", failing_replace)
    kw = dict(max_tokens=TOKENS, batch_tokens=BATCH, checkpoint_tokens=CKPT, progress=False)
    with pytest.raises(OSError, match="simulated crash"):
        S.collect_second_moments(model, tok, LAYERS, text_corpus, checkpoint=ckpt, **kw)
    monkeypatch.setattr(S.os, "replace", real_replace)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind
    _, meta = S._verified_load(ckpt)
    assert meta["batches_done"] >= 1
    resumed = S.collect_second_moments(model, tok, LAYERS, text_corpus, checkpoint=ckpt, **kw)
    for layer in LAYERS:
        assert resumed[layer].count == TOKENS and torch.equal(resumed[layer].sum(), checkpointed[layer].sum())
        # checkpoints re-base the fp32 chunk sums, so a checkpointed run differs from an
        # uncheckpointed one only by rounding (fp32 chunks of ≤600 rows: ~1e-6 relative)
        assert _rel(resumed[layer].sum(), collected[layer].sum().double()) < 1e-5


def test_mismatched_or_corrupt_checkpoint_restarts(smollm2, tmp_path, text_corpus):
    model, tok = smollm2
    kw = dict(max_tokens=300, batch_tokens=BATCH, checkpoint_tokens=CKPT, progress=False)
    ckpt = tmp_path / "c.safetensors"
    S._write_checkpoint(ckpt, {"format": S.CHECKPOINT_FORMAT, "plan": "other"}, {}, 1, 5)
    with pytest.warns(UserWarning, match="different run"):
        a = S.collect_second_moments(model, tok, [0], text_corpus, checkpoint=ckpt, **kw)[0]
    ckpt.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring statistics checkpoint"):
        b = S.collect_second_moments(model, tok, [0], text_corpus, checkpoint=ckpt, **kw)[0]
    assert a.count == b.count == 300 and torch.equal(a.sum(), b.sum())


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = S.collect_second_moments

    def wrapped(*a, **k):
        calls.append(list(a[2]))
        return real(*a, **k)

    monkeypatch.setattr(S, "collect_second_moments", wrapped)
    return calls


def test_cache_round_trip_and_damage(smollm2, tmp_path, text_corpus, spy):
    model, tok = smollm2
    kw = dict(corpus=text_corpus, max_tokens=300, cache_dir=tmp_path, progress=False, batch_tokens=BATCH)
    first = S.load_or_collect(model, tok, [2, 0], **kw)
    assert sorted(first) == [0, 2] and spy == [[0, 2]]  # both layers in one collection
    for layer, st in first.items():
        assert st.count == 300 and st.mean.dtype == torch.float64 and st.mean.shape == (1536, 1536)
        assert st.meta["corpus"] == text_corpus.id and st.meta["layer"] == layer and st.meta["dtype"] == "float32"
        assert {"torch", "transformers", "pmedit"} <= set(st.meta["versions"])
    assert not list(tmp_path.rglob("*checkpoint*")) and not list(tmp_path.rglob(".*"))
    again = S.load_or_collect(model, tok, [0, 2], **kw)
    assert spy == [[0, 2]]  # served from the cache
    assert torch.equal(again[0].mean, first[0].mean)

    # corrupt layer 0 (one flipped byte inside the tensor data), swap layer 2 for layer 0's file
    p0, p2 = first[0].path, first[2].path
    raw = bytearray(p0.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    good0 = p0.read_bytes()
    p0.write_bytes(bytes(raw))
    p2.write_bytes(good0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fixed = S.load_or_collect(model, tok, [0, 2], **kw)
    msgs = " | ".join(str(x.message) for x in w)
    assert "checksum mismatch" in msgs and "different run" in msgs and "layer=0 (want 2)" in msgs
    assert spy[-1] == [0, 2]
    for layer in (0, 2):
        assert torch.equal(fixed[layer].mean, first[layer].mean)
    p0.write_bytes(good0[:1000])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        S.load_or_collect(model, tok, [0], **kw)

    # a different token count is a different file, not a silent reuse
    other = S.load_or_collect(model, tok, [0], **{**kw, "max_tokens": 200})
    assert other[0].count == 200 and other[0].path != first[0].path


def test_npz_round_trip_and_import(smollm2, tmp_path, text_corpus, spy):
    model, tok = smollm2
    kw = dict(corpus=text_corpus, max_tokens=200, cache_dir=tmp_path / "a", progress=False, batch_tokens=BATCH)
    st = S.load_or_collect(model, tok, [1], **kw)[1]
    npz = tmp_path / "layer1_float32_mom2_200.npz"
    S.export_npz(st, npz)
    with np.load(npz, allow_pickle=False) as z:
        assert {"mom2.mom2", "mom2.count"} <= set(z.files)
    back = S.import_npz(npz)
    assert back.count == st.count and torch.equal(back.mean * back.count, st.mean * st.count)
    # into another cache, where load_or_collect then finds it without collecting
    n_calls = len(spy)
    S.import_npz_to_cache(model, tok, 1, npz, corpus=text_corpus, max_tokens=200, cache_dir=tmp_path / "b")
    got = S.load_or_collect(model, tok, [1], **{**kw, "cache_dir": tmp_path / "b"})[1]
    assert len(spy) == n_calls and got.count == 200 and torch.allclose(got.mean, st.mean, rtol=1e-12, atol=0)
    assert got.meta["imported_from"] == str(npz)


def test_npz_from_memit_fp32_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((50, 6)).astype(np.float32)
    mom2 = k.T @ k
    mom2[0, 1] += 1e-6  # fp32 sums are not exactly symmetric
    p = tmp_path / "memit.npz"
    np.savez(p, **{"mom2.mom2": mom2, "mom2.count": np.int64(50), "mom2.constructor": np.str_("SecondMoment()")})
    st = S.import_npz(p, dim=6)
    assert st.count == 50 and st.mean.dtype == torch.float64 and torch.equal(st.mean, st.mean.T)
    torch.testing.assert_close(st.mean, torch.from_numpy(k.astype(np.float64).T @ k / 50), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer needs 8x8"):
        S.import_npz(p, dim=8)
    q = tmp_path / "missing.npz"
    np.savez(q, **{"mom2.mom2": mom2})
    with pytest.raises(ValueError, match=r"missing \['mom2.count'\]"):
        S.import_npz(q)
    o = tmp_path / "objects.npz"
    np.savez(o, **{"mom2.mom2": np.array([{"a": 1}], dtype=object), "mom2.count": np.int64(1)})
    with pytest.raises(ValueError, match="pickle"):
        S.import_npz(o)
    z = tmp_path / "zero.npz"
    np.savez(z, **{"mom2.mom2": mom2, "mom2.count": np.int64(0)})
    with pytest.raises(ValueError, match="positive integer"):
        S.import_npz(z)
    nf = tmp_path / "notnpz.npz"
    nf.write_bytes(b"not a zip")
    with pytest.raises((ValueError, OSError), match="notnpz.npz"):
        S.import_npz(nf)
    with pytest.raises(OSError, match="absent.npz"):
        S.import_npz(tmp_path / "absent.npz")


def test_bad_inputs(smollm2, tmp_path):
    model, tok = smollm2
    with pytest.raises(LayerIndexError, match="layer index 30 out of range"):
        S.load_or_collect(model, tok, [3, 30], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="at least one layer"):
        S.collect_second_moments(model, tok, [], ["text"], max_tokens=10)
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        S.collect_second_moments(model, tok, [0, "1"], ["text"], max_tokens=10)
    with pytest.raises(ValueError, match="empty"):
        S.collect_second_moments(model, tok, [0], [], max_tokens=10)
    with pytest.raises(ValueError, match="record 1"):
        S.load_or_collect(model, tok, [0], corpus=["fine", None], cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        S.load_or_collect(model, tok, [0], corpus=tmp_path / "nowhere.jsonl", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        S.collect_second_moments(model, tok, [0], ["text"], max_tokens=0)
    with pytest.warns(UserWarning, match="holds only"):
        small = S.collect_second_moments(model, tok, [0], ["A short text.", "Another one."], max_tokens=10_000,
                                         progress=False)
    assert small[0].count == len(tok("A short text.")["input_ids"]) + len(tok("Another one.")["input_ids"])


def test_cli_collects_exports_and_imports(smollm2, tmp_path, monkeypatch, capsys):
    from pmedit import cli, models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm2)  # the session's model, not a reload
    cache = tmp_path / "cache"
    rc = cli.main(["stats", "--layers", "0-1", "--tokens", "150", "--batch-tokens", "256", "--cache-dir", str(cache),
                   "--export-npz", str(tmp_path / "npz"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "layer   0: 150 tokens, d=1536" in out and "layer   1: 150 tokens" in out
    npz = tmp_path / "npz" / "layer1_float32_mom2_150.npz"
    assert npz.is_file()
    rc = cli.main(["stats", "--layers", "3", "--tokens", "150", "--cache-dir", str(cache), "--import-npz", str(npz)])
    assert rc == 0 and "imported" in capsys.readouterr().out
    model, tok = smollm2
    got = S.load_or_collect(model, tok, [1, 3], max_tokens=150, cache_dir=cache, progress=False)
    assert torch.allclose(got[3].mean, got[1].mean, rtol=1e-12, atol=0)  # served from the imported file
    assert cli.main(["stats", "--layers", "0,1", "--import-npz", str(npz)]) == 2
    with pytest.raises(SystemExit):
        cli.main(["stats", "--layers", "5-2"])
