"""C0 statistics on many processes: data parallelism on torch.distributed (run under torchrun).

Every rank plans the same batches (:func:`pmedit.stats.plan_batches` is deterministic) and takes
a fixed share: batches are dealt longest-first to the rank with the fewest padded tokens so far,
so the shares depend only on the plan and the world size. Each rank adds its batches' keys with
the ordinary :class:`pmkernels.SecondMoment` kernels; the fp64 sums and the counts are then
``all_reduce``d layer by layer and rank 0 writes the verified cache files. Since each batch enters
the fp64 sum as its own fp32 partial sum (:func:`pmedit.stats.flush_batch`), those files hold
what one process writes for the same arguments, up to fp64 rounding (≈1e-16 relative).

Failures are never silent and never half-written:

- Before any work the ranks exchange what they were asked to do (model fingerprint, layers,
  corpus, token budget, batching, seed, context length, dtype, pmedit version) and, after
  planning, the plan's digest; any difference is a ValueError on every rank naming the field and
  the ranks. A corpus with fewer batches than ranks is a ValueError on every rank.
- An exception on one rank reaches all of them (every phase ends with an exchange of status); a
  rank that dies breaks the connections and the others raise :class:`RankFailure`. Rank 0
  writes only after every rank finished and the sums were reduced, each file atomically.
- With checkpoints (the default in :func:`load_or_collect_distributed`), each rank saves its
  partial sums every ``checkpoint_tokens`` of its own tokens and when its share is done, under
  ``<cache>/<fingerprint>/<run>.ranks/rankRRRR-of-WWWW.safetensors``. Restarting with the same
  world size resumes every rank where it stopped. A different world size is refused: its shares
  differ, so the partial sums cannot be combined (finish with the old size, or delete the folder).

Memory per rank: each layer in flight holds an fp64 sum and an fp32 tile on the model's
device, 12·d² bytes (d = 14336, Llama-3-8B: 2.47 GB per layer); the host receives one layer's
fp64 sum at a time (8·d², 1.6 GB), copied in row blocks so the device needs no d×d temporary.
``layers_per_pass`` bounds the layers in flight (one pass over the rank's share per group).

Metadata goes over a gloo group as JSON bytes in uint8 tensors (``all_gather_object`` would
pickle). Sums are reduced on the host over gloo (``reduce="host"``, also used in bounded mode)
or on the device over the default group (``reduce="device"``: NCCL on GPUs); ``"auto"`` picks the
device when the default group is NCCL and ``layers_per_pass`` is not set.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pmedit import stats as S
from pmedit.corpus import resolve_corpus
from pmedit.fileio import load_verified, remove_stale_temps, save_verified
from pmedit.models import ModelSpec, cache_root

log = logging.getLogger(__name__)

RANK_CHECKPOINT_FORMAT = "pmedit-stats-rank-checkpoint-1"
_HOST_BLOCK_ELEMS = 1 << 24  # rows of a d×d sum copied to the host at a time: ≤ 128 MB of fp64


class RankFailure(RuntimeError):
    """Another rank failed or died; nothing was written."""


def shard_batches(plan: S.Plan, world: int) -> list[list[int]]:
    """Batch indices of each rank: longest first to the least-loaded rank (padded tokens)."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for b, batch in enumerate(plan.batches):
        r = min(range(world), key=lambda i: (loads[i], i))
        out[r].append(b)
        loads[r] += len(batch) * max(len(d) for d in batch)
    return out


# ------------------------------------------------------------------------ collectives
class _Comm:
    """rank, world size, the gloo group for metadata (and host reductions) and what to say on loss."""

    def __init__(self, checkpoint_hint: str = "", *, local: bool = False):
        self.hint = checkpoint_hint
        if local:  # one process without a process group (bounded mode on a single machine)
            self.rank, self.world, self.backend, self.host = 0, 1, None, None
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: run under torchrun (see README, "
                               "'many GPUs / many machines') or call torch.distributed.init_process_group first")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        self.host = None if self.backend == "gloo" else dist.new_group(backend="gloo")

    def close(self) -> None:
        if self.host is not None:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(self.host)

    @contextlib.contextmanager
    def talking(self, what: str):
        try:
            yield
        except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
            raise RankFailure(
                f"rank {self.rank} of {self.world}: lost contact with another rank while {what} ({e}). A rank "
                f"died or was killed; no statistics were written.{self.hint}") from e

    def all_reduce(self, t: torch.Tensor, *, on_device: bool = False) -> None:
        if self.backend is not None:
            dist.all_reduce(t, group=None if on_device else self.host)

    def broadcast(self, t: torch.Tensor) -> None:
        if self.backend is not None:
            dist.broadcast(t, 0, group=self.host)

    def exchange(self, obj, what: str) -> list:
        """Every rank's ``obj`` (JSON-able), in rank order."""
        if self.backend is None:
            return [json.loads(json.dumps(obj))]
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        with self.talking(what):
            n = torch.tensor([data.numel()], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, n, group=self.host)
            width = int(max(int(s) for s in sizes))
            buf = torch.zeros(width, dtype=torch.uint8)
            buf[: data.numel()] = data
            parts = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.world)]
            dist.all_gather(parts, buf, group=self.host)
        return [json.loads(p[: int(s)].numpy().tobytes()) for p, s in zip(parts, sizes)]

    def together(self, what: str, fn):
        """``fn()`` on every rank; if it raised anywhere, every rank raises (its own error, or a
        RankFailure naming the ranks that failed and their errors)."""
        try:
            value, err, exc = fn(), None, None
        except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
            value, err, exc = None, f"{type(e).__name__}: {e}", e
        status = self.exchange({"error": err}, what)
        bad = [(r, s["error"]) for r, s in enumerate(status) if s["error"]]
        if bad:
            if exc is not None:
                raise exc
            msg = "; ".join(f"rank {r}: {e}" for r, e in bad)
            raise RankFailure(f"{what} failed on {msg}. No statistics were written.{self.hint}")
        return value

    def agree(self, what: str, fields: dict) -> None:
        """ValueError on every rank when the ranks' ``fields`` differ, naming field and ranks."""
        got = self.exchange(fields, what)
        for k in fields:
            vals = [g.get(k) for g in got]
            if any(v != vals[0] for v in vals):
                per = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(vals))
                raise ValueError(f"ranks disagree on {k} ({per}); every rank must load the same model "
                                 f"with the same dtype and be given the same arguments")


def _host_sum(sm) -> torch.Tensor:
    """The full symmetric fp64 sum of a flushed SecondMoment on the host, copied in row blocks.

    Reads its fp64 upper triangle directly (pmkernels has no public accessor for this yet):
    ``state_dict()`` would build two more d×d fp64 matrices on the device (4.9 GB at d = 14336).
    """
    S.flush_batch({0: sm})
    m = sm._master
    d = m.shape[0]
    out = torch.empty((d, d), dtype=torch.float64)
    rows = max(1, _HOST_BLOCK_ELEMS // d)
    for i in range(0, d, rows):
        out[i:i + rows] = m[i:i + rows].to("cpu")
    out.triu_()
    return out.add_(out.triu(1).T)


# -------------------------------------------------------------------------- checkpoints
def _rank_file(folder: Path, rank: int, world: int) -> Path:
    return folder / f"rank{rank:04d}-of-{world:04d}.safetensors"


def _other_world_sizes(folder: Path, world: int) -> list[int]:
    if not folder.is_dir():
        return []
    sizes = {int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"rank\d{4}-of-(\d{4})\.safetensors", p.name))}
    return sorted(sizes - {world})


def _save_rank(path: Path, meta: dict, sms: dict, pos: int, done: int) -> None:
    tensors = {}
    for layer, sm in sms.items():
        tensors[f"{layer}.sum"] = _host_sum(sm)
        tensors[f"{layer}.count"] = torch.tensor([sm.count], dtype=torch.int64)
    save_verified(path, tensors, {**meta, "position": pos, "tokens_done": done})


def _resume_rank(path: Path, meta: dict, sms: dict, plan: S.Plan, shard: list[int]) -> tuple[int, int]:
    try:
        tensors, saved = load_verified(path, what="rank checkpoint")
    except ValueError as e:
        warnings.warn(f"ignoring {e}; this rank starts its share from the beginning", stacklevel=3)
        return 0, 0
    bad = [k for k in meta if saved.get(k) != meta[k]]
    pos, done = int(saved.get("position", -1)), int(saved.get("tokens_done", -1))
    if bad or not 0 < pos <= len(shard) or done != sum(len(d) for b in shard[:pos] for d in plan.batches[b]):
        why = f"made for another run ({', '.join(bad)} differ)" if bad else "inconsistent progress record"
        warnings.warn(f"ignoring rank checkpoint {path}: {why}; this rank starts its share from the beginning",
                      stacklevel=3)
        return 0, 0
    for layer, sm in sms.items():
        sm.load_state_dict({"sum": tensors[f"{layer}.sum"], "count": tensors[f"{layer}.count"].reshape(())})
    log.info("rank checkpoint %s: resuming after %d of %d batches (%d tokens)", path, pos, len(shard), done)
    return pos, done


# --------------------------------------------------------------------------- collection
def collect_distributed(model: nn.Module, tokenizer, layers: int | Iterable[int], corpus="wiki-offline", *,
                        max_tokens: int, batch_tokens: int = S.DEFAULT_BATCH_TOKENS, seed: int = 0,
                        max_length: int | None = None, progress: bool = True, backend: str = "auto",
                        checkpoint_dir: str | os.PathLike | None = None,
                        checkpoint_tokens: int = S.DEFAULT_CHECKPOINT_TOKENS, layers_per_pass: int | None = None,
                        reduce: str = "auto", on_group=None, spec: ModelSpec | None = None,
                        _local: bool = False) -> dict[int, S.LayerStats]:
    """Σ k kᵀ over the same ``max_tokens`` tokens one process would use, split over the ranks.

    Call on every rank with the same arguments. Returns {layer: LayerStats} (reduced sums, on
    every rank; ``path`` None). ``on_group(stats)`` is called on every rank after each group of
    ``layers_per_pass`` layers is reduced (load_or_collect_distributed writes files there).
    """
    from pmkernels.covariance import SecondMoment

    comm = _Comm(f" Restarting with the same world size resumes from the rank checkpoints in {checkpoint_dir}."
                 if checkpoint_dir is not None else "", local=_local)
    try:
        if reduce not in ("auto", "host", "device"):
            raise ValueError(f"reduce must be 'auto', 'host' or 'device', got {reduce!r}")

        def validate():
            for name, v in (("max_tokens", max_tokens), ("batch_tokens", batch_tokens),
                            ("checkpoint_tokens", checkpoint_tokens), ("layers_per_pass", layers_per_pass or 1)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name} must be a positive int, got {v!r}")
            sp = spec or ModelSpec.from_model(model)
            return sp, S._normalize_layers(sp, layers), resolve_corpus(corpus), \
                int(max_length or S.context_length(model, tokenizer))

        sp, lays, corp, ctx = comm.together("checking the arguments", validate)
        import pmedit

        comm.agree("checking that the ranks match", {
            "model fingerprint": sp.fingerprint, "layers": lays, "corpus": corp.id, "max_tokens": max_tokens,
            "batch_tokens": batch_tokens, "seed": seed, "context length": ctx, "checkpoint_tokens": checkpoint_tokens,
            "dtype": S._DTYPE_NAMES.get(sp.dtype, str(sp.dtype)), "pmedit version": pmedit.__version__,
            "layers_per_pass": layers_per_pass, "checkpoints": checkpoint_dir is not None})
        plan = comm.together("planning the batches", lambda: S.plan_batches(
            tokenizer, corp, max_tokens=max_tokens, batch_tokens=batch_tokens, max_length=ctx, seed=seed))
        comm.agree("comparing the plans", {"plan digest": plan.digest, "tokens": plan.tokens})
        if len(plan.batches) < comm.world:
            raise ValueError(f"corpus {corp.id!r} gives {len(plan.batches)} batches of ≤ {batch_tokens} tokens "
                             f"({plan.tokens} tokens) for {comm.world} ranks; every rank needs at least one: use more "
                             "tokens (a larger corpus), a smaller batch_tokens, or fewer processes")
        shard = shard_batches(plan, comm.world)[comm.rank]
        mode = reduce
        if mode == "auto":
            mode = "device" if comm.backend == "nccl" and layers_per_pass is None else "host"
        g = layers_per_pass or len(lays)
        out: dict[int, S.LayerStats] = {}
        for gi in range(0, len(lays), g):
            group = lays[gi:gi + g]
            got = _collect_group(comm, model, tokenizer, sp, plan, shard, group, corp, ctx,
                                 backend=backend, progress=progress, checkpoint_dir=checkpoint_dir,
                                 checkpoint_tokens=checkpoint_tokens, mode=mode, SecondMoment=SecondMoment)
            if on_group is not None:
                comm.together(f"storing layers {group}", lambda: on_group(got))
            out.update(got)
            if checkpoint_dir is not None:
                _remove_rank_files(comm, _group_dir(Path(checkpoint_dir), group))
        return out
    finally:
        comm.close()


def _group_dir(checkpoint_dir: Path, layers: list[int]) -> Path:
    return checkpoint_dir / f"L{'-'.join(map(str, layers))}"


def _remove_rank_files(comm: _Comm, folder: Path) -> None:
    _rank_file(folder, comm.rank, comm.world).unlink(missing_ok=True)
    comm.exchange(None, "removing rank checkpoints")  # every rank's file is gone before the folder
    if comm.rank == 0:
        with contextlib.suppress(OSError):
            folder.rmdir()
            folder.parent.rmdir()


def _collect_group(comm: _Comm, model, tokenizer, spec, plan, shard, layers, corpus, ctx, *, backend, progress,
                   checkpoint_dir, checkpoint_tokens, mode, SecondMoment) -> dict[int, S.LayerStats]:
    t0 = time.perf_counter()
    path = meta = None
    if checkpoint_dir is not None:
        folder = _group_dir(Path(checkpoint_dir), layers)
        path = _rank_file(folder, comm.rank, comm.world)

        def check_world():
            other = _other_world_sizes(folder, comm.world)
            if other:
                raise ValueError(
                    f"{folder} holds rank checkpoints of a run with {other[0]} processes; this run has {comm.world}. "
                    f"Their shares of the batches differ, so they cannot be combined: finish with {other[0]} "
                    f"processes in all (torchrun --nnodes × --nproc-per-node), or delete {folder} to start over")
            remove_stale_temps(path)

        comm.together("checking the rank checkpoints", check_world)
        meta = {"format": RANK_CHECKPOINT_FORMAT, "fingerprint": spec.fingerprint, "plan": plan.digest,
                "layers": layers, "rank": comm.rank, "world_size": comm.world, "shard": shard,
                "dtype": S._DTYPE_NAMES.get(spec.dtype, str(spec.dtype))}

    def accumulate():
        sms = {layer: SecondMoment(spec.intermediate_size, device=spec.down_proj(model, layer).weight.device,
                                   backend=backend) for layer in layers}
        pos, done = (0, 0)
        if path is not None and path.exists():
            pos, done = _resume_rank(path, meta, sms, plan, shard)
        start = pos
        state = {"pos": pos}

        def after_batch(b, before, now):
            state["pos"] += 1
            if path is not None and state["pos"] < len(shard) and now // checkpoint_tokens > before // checkpoint_tokens:
                _save_rank(path, meta, sms, state["pos"], now)

        total = sum(len(d) for b in shard for d in plan.batches[b])
        log.info("rank %d/%d: layers %s, %d of %d batches (%d tokens)%s", comm.rank, comm.world, layers, len(shard),
                 len(plan.batches), total, f", resuming after {pos}" if pos else "")
        done = S.run_batches(model, tokenizer, spec, sms, plan.batches, shard[pos:], tokens_done=done, total=total,
                             after_batch=after_batch, progress=progress and comm.rank == 0,
                             desc=f"C0 rank {comm.rank}/{comm.world} layers {layers[0]}..{layers[-1]}")
        if path is not None and start < len(shard):
            _save_rank(path, meta, sms, len(shard), done)  # a finished share survives another rank's death
        if any(sm.count != total for sm in sms.values()):  # an accounting bug, never user input
            raise RuntimeError(f"rank {comm.rank}: counted {[sm.count for sm in sms.values()]}, planned {total}")
        return sms

    sms = comm.together(f"collecting layers {layers}", accumulate)
    out = {}
    for layer in layers:
        with comm.talking(f"reducing layer {layer}"):
            if mode == "device":
                s = sms[layer].sum()
                comm.all_reduce(s, on_device=True)
                s = s.cpu()
            else:
                s = _host_sum(sms[layer])
                comm.all_reduce(s)
            c = torch.tensor([sms[layer].count], dtype=torch.int64)
            comm.all_reduce(c)
        del sms[layer]  # free the device memory before the next layer's host copy
        count = int(c)
        if count != plan.tokens:
            raise RuntimeError(f"layer {layer}: the ranks counted {count} tokens in all, the plan has {plan.tokens}")
        out[layer] = S.LayerStats(mean=s.div_(count), count=count, layer=layer,
                                  meta={"world_size": comm.world, "seconds": round(time.perf_counter() - t0, 2)})
    return out


# ---------------------------------------------------------------------------------- cache
def load_or_collect_distributed(model: nn.Module, tokenizer, layers: int | Iterable[int], *, corpus="wiki-offline",
                                max_tokens: int = 100_000, cache_dir: str | os.PathLike | None = None,
                                progress: bool = True, batch_tokens: int = S.DEFAULT_BATCH_TOKENS, seed: int = 0,
                                max_length: int | None = None, checkpoint_tokens: int = S.DEFAULT_CHECKPOINT_TOKENS,
                                backend: str = "auto", layers_per_pass: int | None = None,
                                reduce: str = "auto") -> dict[int, S.LayerStats]:
    """:func:`pmedit.stats.load_or_collect` over every rank of the process group (call it on all).

    Rank 0's cache decides which layers are missing; those are collected by all ranks and rank 0
    writes them (the files one process would write). Every rank returns every layer (cached
    ones are broadcast from rank 0). Without an initialised process group this is load_or_collect,
    or with ``layers_per_pass`` the same bounded passes in this one process.
    """
    local = not (dist.is_available() and dist.is_initialized())
    if local and layers_per_pass is None:
        return S.load_or_collect(model, tokenizer, layers, corpus=corpus, max_tokens=max_tokens, cache_dir=cache_dir,
                                 progress=progress, batch_tokens=batch_tokens, seed=seed, max_length=max_length,
                                 checkpoint_tokens=checkpoint_tokens, backend=backend)
    comm = _Comm(local=local)
    try:
        def look():
            spec = ModelSpec.from_model(model)
            lays = S._normalize_layers(spec, layers)
            corp = resolve_corpus(corpus)
            ctx = int(max_length or S.context_length(model, tokenizer))
            root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "stats"
            keys = {layer: S._key(spec, layer, corp.id, max_tokens, seed, ctx) for layer in lays}
            have = {}
            if comm.rank == 0:
                for layer in lays:
                    p = S.stats_path(root, keys[layer])
                    if p.exists():
                        try:
                            have[layer] = S.read_layer_stats(p, keys[layer])
                        except ValueError as e:
                            warnings.warn(f"cached statistics {p} are unusable ({e}); recomputing", stacklevel=4)
            return spec, lays, corp, ctx, root, keys, have

        spec, lays, corp, ctx, root, keys, have = comm.together("looking up the cache", look)
        comm.agree("checking that the ranks match", {
            "model fingerprint": spec.fingerprint, "layers": lays, "corpus": corp.id, "max_tokens": max_tokens,
            "seed": seed, "context length": ctx, "dtype": keys[lays[0]]["dtype"]})
        cached = comm.exchange(sorted(have), "sharing the cache lookup")[0]
        out = {layer: have[layer] if comm.rank == 0 else None for layer in cached}
        for layer in cached:
            with comm.talking(f"sending cached layer {layer}"):
                s = have[layer].sum if comm.rank == 0 else torch.empty((spec.intermediate_size,) * 2, dtype=torch.float64)
                c = torch.tensor([have[layer].count if comm.rank == 0 else 0], dtype=torch.int64)
                comm.broadcast(s)
                comm.broadcast(c)
            if comm.rank != 0:
                out[layer] = S.LayerStats(mean=s / int(c), count=int(c), layer=layer, meta=dict(keys[layer]))
        missing = [layer for layer in lays if layer not in cached]
        if missing:
            k0 = keys[missing[0]]
            ckpt = root / spec.fingerprint / (f"{S._safe(corp.id)}__n{max_tokens}__{k0['dtype']}__s{seed}"
                                               f"__ctx{ctx}__b{batch_tokens}.ranks")

            def store(group_stats):
                for layer, st in group_stats.items():
                    st.meta = {**keys[layer], "count": st.count, **st.meta}
                    if comm.rank == 0:
                        p = S.stats_path(root, keys[layer])
                        S.save_layer_stats(p, keys[layer], st.mean * st.count, st.count,
                                           corpus_description=corp.description, batch_tokens=batch_tokens,
                                           world_size=comm.world, seconds=st.meta.get("seconds"))
                        group_stats[layer] = S.read_layer_stats(p, keys[layer])

            got = collect_distributed(model, tokenizer, missing, corp, max_tokens=max_tokens, batch_tokens=batch_tokens,
                                      seed=seed, max_length=ctx, progress=progress, backend=backend,
                                      checkpoint_dir=ckpt, checkpoint_tokens=checkpoint_tokens,
                                      layers_per_pass=layers_per_pass, reduce=reduce, on_group=store, spec=spec,
                                      _local=local)
            out.update(got)
        return {layer: out[layer] for layer in lays}
    finally:
        comm.close()


def init_from_env(device: str = "cpu", *, timeout_s: float = 1800.0) -> tuple[int, int, str]:
    """Initialise the default process group from torchrun's environment (gloo on CPU, NCCL on
    CUDA; each process takes GPU LOCAL_RANK). Returns (rank, world size, the device to use)."""
    from datetime import timedelta

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("no torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); "
                           "start with: torchrun --nproc-per-node N -m pmedit stats ...")
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device
