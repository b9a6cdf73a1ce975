"""One rank of the ``stats`` bench's distributed case (started by torchrun from pmedit.bench.stats).

    torchrun --nproc-per-node N -m pmedit.bench.stats_worker --out RESULT.json [--tokens T ...]

Every rank loads the default model, plans the same batches and collects its share through
:func:`pmedit.stats_distributed.collect_distributed` (no checkpoints, no cache), ``repeats``
times after one warm-up; rank 0 writes the wall time of each collection (from a barrier
before it to the end of the reduction) as JSON.
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--layers", default="4,5,6,7,8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from pmedit import stats_distributed as D
    from pmedit.corpus import resolve_corpus
    from pmedit.fileio import atomic_write_json
    from pmedit.models import load_model

    rank, world, _ = D.init_from_env("cpu")
    model, tok = load_model()
    corpus = resolve_corpus("wiki-offline")
    layers = [int(x) for x in args.layers.split(",")]
    kw = dict(batch_tokens=args.batch_tokens, progress=False)
    D.collect_distributed(model, tok, layers, corpus, max_tokens=min(args.tokens, 2 * args.batch_tokens * world), **kw)
    times, tokens = [], 0
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        got = D.collect_distributed(model, tok, layers, corpus, max_tokens=args.tokens, **kw)
        times.append(time.perf_counter() - t0)
        tokens = got[layers[0]].count
    if rank == 0:
        atomic_write_json(args.out, {"world": world, "tokens": tokens, "seconds": times, "layers": layers})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
