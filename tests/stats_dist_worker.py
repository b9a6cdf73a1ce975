"""One rank of the distributed-statistics tests (tests/test_stats_distributed.py starts them).

    python tests/stats_dist_worker.py CONFIG.json      # with RANK, WORLD_SIZE, MASTER_ADDR/PORT set

A tiny random Llama (seeded, so every rank builds the same weights) and a character tokenizer:
no download. CONFIG keys: cache, tokens, batch_tokens, checkpoint_tokens, layers, layers_per_pass,
reduce, texts, out; faults per rank: kill_rank/kill_after (SIGKILL after that many forward
passes), raise_rank (an exception in the forward pass), layers_rank1, model_seed_rank1.
Writes OUT/rankR.json: {"ok": true, ...} or {"error": ..., "type": ...}.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)


class CharTokenizer:
    pad_token_id = 0
    eos_token_id = 0
    model_max_length = 48

    def __call__(self, texts, add_special_tokens=True, truncation=True, max_length=None):
        return {"input_ids": [[1 + ord(c) % 120 for c in t][:max_length] for t in texts]}


def texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "pi", "omega", "x", "tau"]
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 14, (1,), generator=g))
        out.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g)))
    return out


def model(seed: int = 0):
    from conftest import make_tiny_llama

    return make_tiny_llama(hidden=40, intermediate=72, layers=3, vocab=128, seed=seed)


def main() -> int:
    import torch.distributed as dist

    cfg = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    out = Path(cfg["out"]) / f"rank{rank}.json"
    try:
        from pmedit import stats_distributed as D

        dist.init_process_group("gloo")
        m = model(cfg.get("model_seed_rank1", 0) if rank == 1 else 0)
        layers = cfg.get("layers_rank1", cfg["layers"]) if rank == 1 else cfg["layers"]
        calls = [0]

        def fault(*_):
            calls[0] += 1
            if rank == cfg.get("kill_rank") and calls[0] > cfg["kill_after"]:
                os.kill(os.getpid(), signal.SIGKILL)
            if rank == cfg.get("raise_rank"):
                raise FloatingPointError("injected failure in the forward pass")

        m.model.layers[0].register_forward_hook(fault)
        stats = D.load_or_collect_distributed(
            m, CharTokenizer(), layers, corpus=texts(cfg.get("texts", 400)), max_tokens=cfg["tokens"],
            cache_dir=cfg["cache"], progress=False, batch_tokens=cfg["batch_tokens"],
            checkpoint_tokens=cfg["checkpoint_tokens"], layers_per_pass=cfg.get("layers_per_pass"),
            reduce=cfg.get("reduce", "auto"))
        res = {"ok": True, "counts": {str(k): v.count for k, v in stats.items()},
               "sum_of_sums": {str(k): float(v.sum.sum()) for k, v in stats.items()}, "forward_calls": calls[0]}
        code = 0
    except Exception as e:  # noqa: BLE001 - reported to the test
        res = {"error": str(e), "type": type(e).__name__, "traceback": traceback.format_exc()}
        code = 3
    out.write_text(json.dumps(res))
    if code == 0 and dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    rc = main()
    # After a failure the ranks leave without gloo's teardown: destroying a group whose peer may
    # already have closed its sockets can abort (SIGABRT, seen once in CI after both ranks had
    # written their ValueError), which would hide the exit code the tests check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
