"""Bench section ``stats``: C0 collection for several layers in one pass vs one pass per layer.

The reference is what the MEMIT/EasyEdit code does: one collection per layer, each a forward
pass that stops after that layer's ``down_proj`` (their ``nethook.Trace(..., stop=True)``).
Ours runs one pass per batch for all layers, stopping after the deepest. Both go through
:func:`pmedit.stats.collect_second_moments` with the same corpus, token budget, batching and
covariance backend, so the ratio isolates the pass structure. For layers l₁..l₅ the forward
work alone predicts a ratio of about Σ(lᵢ+1) / (l₅+1) (3.3× for layers 1–5, 3.9× for 4–8);
the covariance updates, the same in both, pull it down.

CPU: SmolLM2-135M (the embedded default). GPU (only when CUDA is available): a
Llama-3-8B-shaped model (hidden 4096, MLP 14336, GQA 32/8 heads, vocab 128256) with random bf16
weights, layers 1–5; only the 6 layers a pass through layer 5 touches are built. The share of
time spent in ``SecondMoment.update`` is measured in a separate, synchronised run.

Distributed case (CPU): the same collection split over 1 and 2 processes of one thread each
under ``torchrun`` (gloo), each process a fresh ``pmedit.bench.stats_worker`` timing
:func:`pmedit.stats_distributed.collect_distributed` from a barrier to the reduced sums
(planning, shards, fp64 all_reduce included; model loading and a warm-up run excluded).
"""
from __future__ import annotations

import time

import torch

from pmedit.bench.harness import Row, compare

ORDER = 30
HELP = "C0 statistics: all layers in one pass vs one pass per layer (MEMIT), tokens/s"
SECTION = "stats"


def _update_share(fn, device) -> float:
    """Fraction of one call of ``fn`` spent inside SecondMoment.update (synchronised timing)."""
    from pmkernels.covariance import SecondMoment

    spent = [0.0]
    real = SecondMoment.update

    def timed(self, x, mask=None):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = real(self, x, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent[0] += time.perf_counter() - t0
        return out

    SecondMoment.update = timed  # bench-only instrumentation of our own class, restored below
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - t0
    finally:
        SecondMoment.update = real
    return spent[0] / total if total > 0 else 0.0


def _case(model, tok, layers: list[int], corpus, *, tokens: int, batch_tokens: int, repeats: int,
          device: torch.device, label: str) -> list[Row]:
    from pmedit.models import ModelSpec
    from pmedit.stats import collect_second_moments

    spec = ModelSpec.from_model(model)
    kw = dict(max_tokens=tokens, batch_tokens=batch_tokens, progress=False, spec=spec)
    results = {}

    def one_pass():
        results["one"] = collect_second_moments(model, tok, layers, corpus, **kw)

    def per_layer():
        results["per"] = {l: collect_second_moments(model, tok, [l], corpus, **kw)[l] for l in layers}

    rows = compare(
        SECTION,
        f"{label} layers {layers[0]}-{layers[-1]} {tokens} tok",
        {"one pass per layer (MEMIT)": per_layer, "one pass, all layers": one_pass},
        reference="one pass per layer (MEMIT)",
        work=tokens,
        unit="tok",
        repeats=repeats,
        warmup=1,
        device=device,
    )
    # The two must agree (same forward ops below the stop point) or the timing means nothing.
    # On the CPU they are bit-identical; GPU kernels may pick other algorithms run to run, so
    # there a relative 1e-2 (bf16 activations carry 8 bits) is the bound.
    for l in layers:
        a, b = results["one"][l], results["per"][l]
        sa, sb = a.sum(), b.sum()
        rel = float((sa - sb).abs().max() / sb.abs().max().clamp_min(1e-300))
        if a.count != b.count or (device.type == "cpu" and rel != 0.0) or rel > 1e-2:
            raise RuntimeError(f"bench stats: layer {l} differs between one-pass and per-layer collection "
                               f"(counts {a.count} vs {b.count}, max relative difference {rel:.3g})")
    share = _update_share(one_pass, device)
    for r in rows:
        r.extra.update({"layers": layers, "batch_tokens": batch_tokens})
    rows[-1].extra["covariance_share"] = round(share, 3)
    print(f"  {label} layers {layers}: {share:.0%} of the one-pass time is in SecondMoment.update", flush=True)
    return rows


LLAMA3_8B_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256)


def _gpu_rows(quick: bool, *, device: str = "cuda", shape: dict = LLAMA3_8B_SHAPE,
              tokens: int | None = None, batch_tokens: int = 16_384) -> list[Row]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pmedit.corpus import resolve_corpus
    from pmedit.models import load_model

    device = torch.device(device)
    _, tok = load_model()  # any tokenizer works with random weights; ids < 49152 fit the vocab
    # 6 layers: a pass that stops in layer 5 never touches the other 26 of Llama-3-8B
    cfg = LlamaConfig(num_hidden_layers=6, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    corpus = resolve_corpus("wiki-offline")
    tokens = tokens or (32_768 if quick else 262_144)
    name = "Llama-3-8B-shaped" if shape is LLAMA3_8B_SHAPE else "small Llama-shaped"
    return _case(model, tok, [1, 2, 3, 4, 5], corpus, tokens=tokens, batch_tokens=batch_tokens,
                 repeats=3 if quick else 5, device=device, label=f"{name} bf16 random ({device.type})")


def _distributed_rows(quick: bool) -> list[Row]:
    import json
    import os
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    tokens, repeats = (4096, 2) if quick else (16384, 3)
    meds = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = Path(tmp) / f"w{world}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
                   str(port), "-m", "pmedit.bench.stats_worker", "--out", str(out), "--tokens", str(tokens),
                   "--repeats", str(repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                raise RuntimeError(f"bench stats: {world}-process run failed:\n{proc.stderr[-3000:]}")
            res = json.loads(out.read_text())
            ts = sorted(res["seconds"])
            med = ts[len(ts) // 2]
            meds[world] = med
            rows.append(Row(section=SECTION, case=f"SmolLM2-135M fp32 cpu layers 4-8 {res['tokens']} tok, torchrun gloo",
                            provider=f"{world} process{'es' if world > 1 else ''} x 1 thread", median_s=med,
                            p20_s=ts[0], p80_s=ts[-1], work=res["tokens"], unit="tok",
                            reference="1 process x 1 thread", extra={"world_size": world, "seconds": res["seconds"]}))
    for r in rows:
        r.ratio = meds[1] / r.median_s
    print(f"  distributed: {meds[1] / meds[2]:.2f}x with 2 processes (goal >= 1.6x)", flush=True)
    return rows


def run(quick: bool = False) -> list[Row]:
    from pmedit.corpus import resolve_corpus
    from pmedit.models import load_model

    rows: list[Row] = []
    model, tok = load_model()
    corpus = resolve_corpus("wiki-offline")
    cpu = torch.device("cpu")
    # Layers 1-5 (the GPU case's span) and 4-8 (MEMIT's usual 5-layer span on Llama models):
    # the deeper the span, the more the per-layer reference repeats.
    tokens, repeats = (512, 3) if quick else (2048, 3)
    for layers in ([1, 2, 3, 4, 5], [4, 5, 6, 7, 8]):
        rows += _case(model, tok, layers, corpus, tokens=tokens, batch_tokens=1024, repeats=repeats,
                      device=cpu, label="SmolLM2-135M fp32 cpu")
    del model
    rows += _distributed_rows(quick)
    if torch.cuda.is_available():
        rows += _gpu_rows(quick)
    return rows
