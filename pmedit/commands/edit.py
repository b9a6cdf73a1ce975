"""``pmedit edit``: edit facts and print greedy completions before and after.

Requests come from a JSON file (a list, or one request), a JSONL file (one per line) in any
layout pmedit.requests accepts, or, with no file, the project's example set
(pmedit.examples) on the default model. The first run on a model collects the C0 statistics
of the edited layers (cached under PMEDIT_CACHE); later runs reuse them.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pmedit.methods import method_names

HELP = "edit facts in a model and show greedy completions before/after"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", type=Path,
                   help="requests as .json (list or one request) or .jsonl; default: the built-in examples")
    p.add_argument("--model", default=None,
                   help="model name or path (.gguf, local dir, hub id); default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="fp32", help="model dtype: fp32, bf16 or fp16 (default fp32)")
    p.add_argument("--method", choices=method_names(), default=None,
                   help="editing method (default: from the preset/hparams, emmet)")
    p.add_argument("--layers", type=_int_list, default=None, help="comma-separated layers to edit, e.g. 4 or 3,4,5")
    p.add_argument("--batch-size", type=int, default=None,
                   help="edits per batch, applied one batch after another (default: all in one batch)")
    p.add_argument("--hparams", type=Path, default=None, help="hyperparameters as .json or .yaml (EditHparams)")
    p.add_argument("--preset", default=None, help="named hyperparameters: smollm2, llama3-8b (default for the "
                   "default model: smollm2)")
    p.add_argument("--steps", type=int, default=None, help="override the value-optimisation steps")
    p.add_argument("--save-deltas", type=Path, default=None, metavar="PATH",
                   help="write the edits as safetensors (load with Editor.load_deltas)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="length of the greedy completions (default 8)")
    p.add_argument("--limit", type=int, default=None, help="edit only the first N requests of the file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("no layers given")
    return out


def read_requests(path: Path) -> list:
    """Requests from .json / .jsonl, validated; errors name the file, and the line for JSONL."""
    from pmedit.data import read_json_records
    from pmedit.requests import normalize_requests

    if not path.is_file():
        raise FileNotFoundError(f"requests file {str(path)!r} does not exist")
    items = read_json_records(path, allow_single=True)
    try:
        reqs = normalize_requests(items)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if not reqs:
        raise ValueError(f"{path}: holds no requests")
    return reqs


def _hparams(args):
    from pmedit.hparams import EditHparams

    if args.hparams is not None and args.preset is not None:
        raise ValueError("give --hparams or --preset, not both")
    # --method goes into the preset, so that the method's own preset fields (its layer, its lr) apply
    if args.hparams is not None:
        hp = EditHparams.load(args.hparams)
    elif args.preset is not None:
        hp = EditHparams.preset(args.preset, **({"method": args.method} if args.method else {}))
    elif args.model is None:
        hp = EditHparams.preset("smollm2", **({"method": args.method} if args.method else {}))
    elif args.layers is None:
        raise ValueError("for a model other than the default, give --layers, --preset or --hparams")
    else:
        hp = EditHparams(layers=args.layers)
    changes = {}
    if args.method is not None:
        changes["method"] = args.method
    if args.layers is not None:
        changes["layers"] = args.layers
    if args.steps is not None:
        changes["steps"] = args.steps
    return hp.replace(**changes) if changes else hp


def greedy_completions(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, one prompt at a time (no padding to get wrong)."""
    import torch

    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def _one_line(text: str, width: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _check_writable_target(path: Path, what: str) -> None:
    """Fail now, not after the edits ran, when ``path`` cannot be written."""
    import tempfile

    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory; give a file name")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OSError(f"{what} {str(path)!r}: cannot write in {str(parent)!r} ({e.strerror or e})") from None


def run(args) -> int:
    from pmedit.editor import Editor
    from pmedit.examples import example_requests
    from pmedit.models import check_finite, load_model, resolve_dtype

    # Everything that can be checked without the model is checked before it loads; failures
    # end in pmedit.cli as one line naming the culprit, exit code 2.
    dtype = resolve_dtype(args.dtype)
    hp = _hparams(args)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    reqs = read_requests(args.file) if args.file is not None else example_requests()
    if args.limit is not None:
        reqs = reqs[: args.limit]
    if args.save_deltas is not None:
        _check_writable_target(args.save_deltas, "--save-deltas")

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=dtype)
    check_finite(model)  # an inf in a weight would surface as a sampling error, far from its cause
    print(f"model loaded in {time.perf_counter() - t0:.1f}s; {hp.method} on layer(s) {list(hp.layers)}, "
          f"{len(reqs)} edit(s), {hp.steps} value steps")
    prompts = [r.filled_prompt for r in reqs]
    before = greedy_completions(model, tok, prompts, args.max_new_tokens)

    editor = Editor(model, tok, hparams=hp, progress=not args.no_progress)
    t1 = time.perf_counter()
    editor.prepare()  # C0 statistics (collected on the first run, then read from the cache)
    prep_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    report = editor.edit(reqs, batch_size=args.batch_size)
    edit_s = time.perf_counter() - t1
    after = greedy_completions(model, tok, prompts, args.max_new_tokens)

    hits = 0
    print()
    print(f"{'prompt':<44} {'before':<26} {'after':<26} new?")
    for r, p, b, a in zip(reqs, prompts, before, after):
        ok = a.strip().startswith(r.target_new.strip())
        hits += ok
        print(f"{_one_line(p, 44):<44} {_one_line(b, 26):<26} {_one_line(a, 26):<26} {'yes' if ok else 'no'}")
    print()
    values_s = sum(b.seconds_values for b in report.batches)
    print(f"{hits}/{len(reqs)} completions now start with target_new. Statistics and templates "
          f"{prep_s:.1f}s; edits {edit_s:.1f}s (value optimisation {values_s:.1f}s); "
          f"{time.perf_counter() - t0:.1f}s in all")
    if args.save_deltas is not None:
        path = editor.save_deltas(args.save_deltas)
        print(f"deltas saved to {path}")
    return 0
