"""``pmedit stats``: collect C0 statistics into the cache; export/import bundles and MEMIT npz files.

Collecting ahead of time is worthwhile for long runs (10⁶+ tokens): the run checkpoints and
resumes where it stopped, and every later edit with the same model, corpus and token count
loads the cached files in milliseconds. Under ``torchrun`` (RANK/WORLD_SIZE set) the work is
split over the processes (pmedit.stats_distributed); rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time

HELP = "collect (or import) C0 second-moment statistics"

_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def _layers(text: str) -> list[int]:
    """'4', '4,5,6', '4-8' or a mix ('1,3-5')."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layer list {text!r}: use e.g. 4 or 4,5,6 or 4-8") from None
    if not out:
        raise argparse.ArgumentTypeError("no layers given")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id, local path or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--layers", type=_layers, default=None,
                   help="layer indices: 4 | 4,5,6 | 4-8 (required, except with --import: default all in the bundle)")
    p.add_argument("--corpus", default="wiki-offline",
                   help="wiki-offline (default) | file.txt | file.jsonl | hf:NAME[:CONFIG]")
    p.add_argument("--text-field", default="text", help="text field of .jsonl / hf records (default: text)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to collect over (default 100000)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="document order seed (default 0)")
    p.add_argument("--max-length", type=int, default=None, help="truncate documents (default: context length)")
    p.add_argument("--dtype", default="fp32", help="model dtype: fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--device-map", default=None, help="e.g. auto (shard across GPUs with accelerate)")
    p.add_argument("--cache-dir", default=None, help="statistics cache (default $PMEDIT_CACHE/stats)")
    p.add_argument("--checkpoint-tokens", type=int, default=1_000_000, help="checkpoint every N tokens")
    p.add_argument("--backend", default="auto", help="covariance backend: auto | torch | cpu | triton | cuda")
    p.add_argument("--import-npz", metavar="FILE", default=None,
                   help="store a MEMIT/EasyEdit stats .npz for the one layer given, instead of collecting")
    p.add_argument("--export-npz", metavar="DIR", default=None, help="also write each layer as a MEMIT-style .npz")
    p.add_argument("--export", metavar="DIR", dest="export_dir", default=None,
                   help="also write the layers as a portable bundle (safetensors + manifest.json)")
    p.add_argument("--import", metavar="DIR", dest="import_dir", default=None,
                   help="verify a bundle made by --export and store it in the cache, instead of collecting")
    p.add_argument("--layers-per-pass", type=int, default=None,
                   help="bounded memory: at most this many layers' sums on the device at a time (one pass each)")
    p.add_argument("--reduce", default="auto", choices=("auto", "host", "device"),
                   help="under torchrun: reduce the fp64 sums on the host (gloo) or the device (NCCL on GPUs)")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="under torchrun: seconds a rank waits for the others (default 1800)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_writable_dir(root, what: str) -> None:
    """Fail before any work when nothing can be written under ``root`` (not a directory, read-only)."""
    import tempfile

    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise OSError(f"{what} {str(root)!r} is not a writable directory ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pmedit.corpus import resolve_corpus
    from pmedit.models import cache_root, resolve_dtype
    from pmedit import stats as S

    # Errors end in pmedit.cli as one line naming the culprit, exit code 2.
    if args.layers is None and not args.import_dir:
        raise ValueError("--layers is required (e.g. --layers 4-8)")
    if args.import_npz and args.import_dir:
        raise ValueError("--import and --import-npz exclude each other")
    if args.import_dir and not Path(args.import_dir, "manifest.json").is_file():
        raise FileNotFoundError(f"--import {args.import_dir!r}: no manifest.json there (not a bundle made by --export)")
    if args.layers_per_pass is not None and args.layers_per_pass < 1:
        raise ValueError(f"--layers-per-pass must be >= 1, got {args.layers_per_pass}")
    if args.import_npz and len(args.layers) != 1:
        raise ValueError("--import-npz needs exactly one layer in --layers")
    if args.import_npz and not Path(args.import_npz).is_file():
        raise FileNotFoundError(f"--import-npz file {args.import_npz!r} does not exist")
    for name in ("tokens", "batch_tokens", "checkpoint_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    root = Path(args.cache_dir).expanduser() if args.cache_dir is not None else cache_root() / "stats"
    for opt, d in (("--export-npz", args.export_npz), ("--export", args.export_dir)):
        if d:
            _check_writable_dir(Path(d), opt)
    _check_writable_dir(root, "statistics cache")
    dtype = resolve_dtype(args.dtype)
    corpus = resolve_corpus(args.corpus, text_field=args.text_field)
    t0 = time.perf_counter()
    rank, world, device = 0, 1, args.device
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not (args.import_dir or args.import_npz):
        from pmedit import stats_distributed as D

        rank, world, device = D.init_from_env(args.device, timeout_s=args.dist_timeout)
    rc = _run(args, S, root, corpus, dtype, device, rank, world, t0)
    # Only a clean finish tears the group down: after an error the peers may be anywhere in a
    # collective, and gloo's teardown then aborts the process (SIGABRT) instead of letting it
    # report the error; the process exit releases the group.
    if world > 1 or "RANK" in os.environ:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return rc


def _run(args, S, root, corpus, dtype, device, rank, world, t0) -> int:
    from pathlib import Path

    import torch

    from pmedit.models import load_model

    model, tok = load_model(args.model, dtype=dtype, device=device, device_map=args.device_map)
    try:
        if args.import_dir:
            paths = S.import_bundle(args.import_dir, model, cache_dir=args.cache_dir, layers=args.layers)
            m, _ = S.read_bundle(args.import_dir)
            for layer, path in paths.items():
                print(f"imported layer {layer}: {path}")
            print(f"edit with mom2_corpus={m['corpus']!r}, mom2_tokens={m['tokens']} (seed {m['seed']}, "
                  f"context {m['max_length']}) to use them")
            return 0
        if args.import_npz:
            path = S.import_npz_to_cache(model, tok, args.layers[0], args.import_npz, corpus=corpus,
                                         max_tokens=args.tokens, cache_dir=args.cache_dir, seed=args.seed,
                                         max_length=args.max_length)
            print(f"imported {args.import_npz} as layer {args.layers[0]} ({corpus.id}, {args.tokens} tokens): {path}")
            return 0
        kw = dict(corpus=corpus, max_tokens=args.tokens, cache_dir=args.cache_dir, progress=not args.no_progress,
                  batch_tokens=args.batch_tokens, seed=args.seed, max_length=args.max_length,
                  checkpoint_tokens=args.checkpoint_tokens, backend=args.backend)
        if "RANK" in os.environ or args.layers_per_pass:
            from pmedit import stats_distributed as D

            try:
                stats = D.load_or_collect_distributed(model, tok, args.layers, layers_per_pass=args.layers_per_pass,
                                                      reduce=args.reduce, **kw)
            except D.RankFailure as e:  # another rank failed: say so on this one too, exit non-zero
                print(f"pmedit stats (rank {rank}): error: {' '.join(str(e).split())}", file=sys.stderr)
                return 1
        else:
            stats = S.load_or_collect(model, tok, args.layers, **kw)
    except OSError as e:  # a disk that filled up (or went read-only) while collecting
        if e.errno not in _WRITE_ERRNOS or e.filename is not None or str(root) in str(e):
            raise
        raise OSError(f"writing statistics under {str(root)!r}: {e.strerror or e}") from e
    if rank != 0:
        return 0
    print(f"corpus {corpus.id}: {corpus.description}" + (f" ({world} processes)" if world > 1 else ""))
    for layer, st in stats.items():
        diag = torch.diagonal(st.mean)
        print(f"layer {layer:3d}: {st.count} tokens, d={st.dim}, trace(C0)={float(diag.sum()):.4g}, "
              f"max diag={float(diag.max()):.4g}  {st.path}")
        if args.export_npz:
            out = Path(args.export_npz) / f"layer{layer}_{st.meta.get('dtype', 'float32')}_mom2_{st.count}.npz"
            S.export_npz(st, out)
            print(f"           exported {out}")
    if args.export_dir:
        print(f"bundle: {S.export_bundle(stats, args.export_dir)}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0
