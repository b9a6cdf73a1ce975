"""``pmedit stats``: collect C0 statistics into the cache, or import MEMIT/EasyEdit npz files.

Collecting ahead of time is worthwhile for long runs (10⁶+ tokens): the run checkpoints and
resumes where it stopped, and every later edit with the same model, corpus and token count
loads the cached files in milliseconds.
"""
from __future__ import annotations

import argparse
import errno
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
    p.add_argument("--layers", type=_layers, required=True, help="layer indices: 4 | 4,5,6 | 4-8")
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

    import torch

    from pmedit.corpus import resolve_corpus
    from pmedit.models import cache_root, load_model, resolve_dtype
    from pmedit import stats as S

    # Errors end in pmedit.cli as one line naming the culprit, exit code 2.
    if args.import_npz and len(args.layers) != 1:
        raise ValueError("--import-npz needs exactly one layer in --layers")
    if args.import_npz and not Path(args.import_npz).is_file():
        raise FileNotFoundError(f"--import-npz file {args.import_npz!r} does not exist")
    for name in ("tokens", "batch_tokens", "checkpoint_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    root = Path(args.cache_dir).expanduser() if args.cache_dir is not None else cache_root() / "stats"
    if args.export_npz:
        _check_writable_dir(Path(args.export_npz), "--export-npz")
    _check_writable_dir(root, "statistics cache")
    dtype = resolve_dtype(args.dtype)
    corpus = resolve_corpus(args.corpus, text_field=args.text_field)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=dtype, device=args.device, device_map=args.device_map)
    try:
        if args.import_npz:
            path = S.import_npz_to_cache(model, tok, args.layers[0], args.import_npz, corpus=corpus,
                                         max_tokens=args.tokens, cache_dir=args.cache_dir, seed=args.seed,
                                         max_length=args.max_length)
            print(f"imported {args.import_npz} as layer {args.layers[0]} ({corpus.id}, {args.tokens} tokens): {path}")
            return 0
        stats = S.load_or_collect(model, tok, args.layers, corpus=corpus, max_tokens=args.tokens,
                                  cache_dir=args.cache_dir, progress=not args.no_progress,
                                  batch_tokens=args.batch_tokens, seed=args.seed, max_length=args.max_length,
                                  checkpoint_tokens=args.checkpoint_tokens, backend=args.backend)
    except OSError as e:  # a disk that filled up (or went read-only) while collecting
        if e.errno not in _WRITE_ERRNOS or e.filename is not None or str(root) in str(e):
            raise
        raise OSError(f"writing statistics under {str(root)!r}: {e.strerror or e}") from e
    print(f"corpus {corpus.id}: {corpus.description}")
    for layer, st in stats.items():
        diag = torch.diagonal(st.mean)
        print(f"layer {layer:3d}: {st.count} tokens, d={st.dim}, trace(C0)={float(diag.sum()):.4g}, "
              f"max diag={float(diag.max()):.4g}  {st.path}")
        if args.export_npz:
            out = Path(args.export_npz) / f"layer{layer}_{st.meta.get('dtype', 'float32')}_mom2_{st.count}.npz"
            S.export_npz(st, out)
            print(f"           exported {out}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0
