"""The four experiments of the batch-size study as sequences of resumable units.

A run is planned as an ordered list of units (one singular-edit chunk of one layer, one batch
size, one batch of a sequence, one λ); each unit's result is stored in the run directory as it
finishes, so an interrupted run resumes at the next unit. Sequential-batch editing carries
state between units (the weights edited so far): after each batch the Editor's deltas are
checkpointed (``Editor.save_deltas``, named by their edit count), and a resumed sequence
continues from them with ``Editor.load_deltas``, which reproduces the uninterrupted run exactly
(deltas files are bit-exact and carry kept keys and method state). A checkpoint is removed only
once the run state records a later one, so a kill between the two writes loses nothing.

- ``layer-sweep``: each record edited alone on each layer (singular edits; a closed form's delta
  is rank one and is evaluated through a per-row hook, see :class:`pmedit.evaluation.hooks.RankOneEdits`;
  a fine-tuned one (LocFT-BF) is dense and goes through :class:`~pmedit.evaluation.hooks.GroupDeltas`).
- ``batch``: for each B, the N records in N/B independent batches, each applied to the unedited
  model and every record scored under its own batch's update (``batch_protocol="independent"``,
  the default; see :mod:`pmedit.groups`), or the study's literal protocol, the first B records in
  one batch scored on those B (``"first-b"``).
- ``sequential-batch``: all ``total_edits`` records in sequential batches of B, scored after
  the batches that reach an ``eval_points`` count (and at the end) on all edits so far.
- ``lambda-sweep``: one batch with the method's ``sweep_field`` (MEMIT's and ROME's ``lam``,
  EMMET's ``lam_e``; see pmedit.methods) set to each value.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pmedit.data import select
from pmedit.evaluation import (GroupDeltas, RankOneEdits, evaluate_counterfact, load_heldout_text, low_rank_factors,
                               perplexity, prompt_entropy, rank_one_factors)
from pmedit.experiments.config import ExperimentConfig
from pmedit.experiments.results import collect_rows, store_summary, write_results
from pmedit.experiments.store import RunStore
from pmedit.methods import get_method
from pmedit.requests import drop_conflicts
from pmedit.evaluation.metrics import bootstrap_intervals
from pmedit.evaluation.registry import load_dataset, run_metric_sets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    key: str
    kind: str  # baseline | singular | batch | seq | lambda
    method: str = ""
    layer: int = -1
    batch_size: int = 0
    index: int = 0  # chunk index (singular) or batch index within a sequence (seq)
    lam: float | None = None


def plan(cfg: ExperimentConfig) -> list[Unit]:
    units = [Unit("baseline", "baseline", layer=cfg.layers[0])] if cfg.baseline else []
    n = cfg.total_edits
    if cfg.experiment == "layer-sweep":
        # chunk by chunk, every method on it in turn: the chunk's keys and values, computed for the
        # first method, serve the others at once (and an interrupted sweep loses one chunk's worth)
        for layer in cfg.layers:
            for c in range((n + cfg.chunk_size - 1) // cfg.chunk_size):
                for m in cfg.methods:
                    units.append(Unit(f"{m}/L{layer}/chunk{c}", "singular", m, layer, 1, c))
        return units
    for m in cfg.methods:
        if cfg.experiment == "batch":
            for b in cfg.batch_sizes:
                units.append(Unit(f"{m}/B{b}", "batch", m, cfg.layers[0], b))
        elif cfg.experiment == "sequential-batch":
            for b in cfg.batch_sizes:
                for k in range(n // b):
                    units.append(Unit(f"{m}/S{b}/batch{k}", "seq", m, cfg.layers[0], b, k))
        else:
            for lam in cfg.lambdas:
                units.append(Unit(f"{m}/lam{lam:g}", "lambda", m, cfg.layers[0], cfg.batch_sizes[0], lam=float(lam)))
    return units


def _seq_eval_counts(cfg: ExperimentConfig, b: int) -> set[int]:
    """Edit counts after which a sequence of batch size b is scored: the first batch boundary
    at or past each eval point, every ``eval.every`` batches, and the end."""
    counts = {cfg.total_edits}
    for p in cfg.eval_points:
        counts.add(-(-p // b) * b)
    if cfg.eval.every:  # every K batches
        counts.update(range(cfg.eval.every * b, cfg.total_edits + 1, cfg.eval.every * b))
    return counts


class _Runner:
    def __init__(self, cfg, model, tok, store: RunStore, progress: bool, second_moments):
        self.cfg, self.model, self.tok, self.store = cfg, model, tok, store
        self.progress = progress
        self.second_moments = second_moments
        # Records that ask another target for a prompt and subject an earlier one rewrites cannot
        # share a batch (both would be refused): dropped before sampling, as MEMIT does.
        recs = load_dataset(cfg.dataset, cfg.data)
        drop = set(drop_conflicts(recs)[1])
        self.n_conflicts_dropped = len(drop)
        self.records = select([r for i, r in enumerate(recs) if i not in drop], cfg.total_edits, seed=cfg.seed)
        if len(self.records) < cfg.total_edits:
            raise ValueError(f"{cfg.data} holds {len(self.records)} records, total_edits={cfg.total_edits}")
        self.requests = [r.as_memit_dict() if hasattr(r, "as_memit_dict") else r for r in self.records]
        self._ppl_texts = None
        self.ge_records = self._ge_records()  # read now: a bad file fails before any editing
        self.value_store = _value_store(cfg)
        self._open_seq: tuple[str, Any] | None = None  # (sequence name, Editor) in progress

    # ------------------------------------------------------------------ helpers
    def editor(self, method: str, layer: int, **hp_changes):
        from pmedit.editor import Editor

        return Editor(self.model, self.tok, hparams=self.hparams(method, layer, **hp_changes),
                      second_moments=self._c0(layer), progress=False, value_store=self.value_store)

    def hparams(self, method: str, layer: int, **hp_changes):
        return self.cfg.edit_hparams(method, **hp_changes).replace(layers=[layer])

    def _ge_records(self):
        e = self.cfg.eval
        if e.ge_data is None:
            return None
        recs = load_dataset("counterfact", e.ge_data)
        if not any(r.generation_prompts for r in recs):
            raise ValueError(f"experiment config field 'eval.ge_data': {e.ge_data} holds no generation prompts "
                             "(the reduced CounterFact layout has none; use the original layout)")
        return select([r for r in recs if r.generation_prompts], e.ge_records, seed=self.cfg.seed)

    def _c0(self, layer: int):
        return None if self.second_moments is None else {layer: self.second_moments[layer]}

    def evaluate(self, records, *, edits=None, groups=None, with_ppl=True, probes=False) -> dict:
        """The config's edit metric sets on ``records`` (and, with ``probes``, its model-level
        probes), one flat summary; metric sets that would start past ``eval.budget_s`` are
        skipped and listed under ``skipped``."""
        e = self.cfg.eval
        t0 = time.perf_counter()
        out: dict[str, Any] = {"summary": {}}
        skipped = []

        def over_budget() -> bool:
            return e.budget_s is not None and time.perf_counter() - t0 > e.budget_s

        for name in self.cfg.edit_metric_sets:
            if over_budget():
                skipped.append(name)
                continue
            if name == "counterfact":  # its per-record scores rebuild S over layer-sweep chunks
                t1 = time.perf_counter()
                res = evaluate_counterfact(
                    self.model, self.tok, records, edits=edits, groups=groups, batch_size=e.batch_size,
                    generation_accuracy=e.generation_accuracy, entropy=e.entropy, max_gen_prompts=e.max_gen_prompts,
                    gen_length=e.gen_length, seed=self.cfg.seed, progress=False,
                )
                out["summary"].update(res.summary)
                out["summary"].update(bootstrap_intervals(res.records, seed=self.cfg.seed))
                out["summary"]["counterfact_seconds"] = time.perf_counter() - t1
                if edits is not None:
                    out["records"] = [r.to_dict() for r in res.records]
            else:
                kw = dict(e.settings)
                if e.batch_size is not None:
                    kw.setdefault(name, {}).setdefault("batch_size", e.batch_size)
                out["summary"].update(run_metric_sets(self.model, self.tok, records, [name], dataset=self.cfg.dataset,
                                                      edits=edits, groups=groups, settings=kw))
        if with_ppl and e.perplexity:
            if self._ppl_texts is None:
                self._ppl_texts = load_heldout_text(e.ppl_text, max_chars=e.ppl_tokens * 8)
            # Under independent group updates the text is scored with the first group's update.
            with _first_group(edits):
                out["ppl"] = perplexity(self.model, self.tok, self._ppl_texts, max_tokens=e.ppl_tokens,
                                        window=e.ppl_window)["ppl"]
        if with_ppl and self.ge_records is not None:
            with _first_group(edits):
                out["summary"].update(prompt_entropy(self.model, self.tok, self.ge_records,
                                                     max_gen_prompts=e.max_gen_prompts, gen_length=e.gen_length,
                                                     seed=self.cfg.seed))
        if probes:
            for name in e.probes:
                if over_budget():
                    skipped.append(name)
                    continue
                with _first_group(edits):  # as perplexity: the model its first update edits
                    out["summary"].update(run_metric_sets(self.model, self.tok, [], [name], dataset=self.cfg.dataset,
                                                          settings=e.settings))
        if skipped:
            out["skipped"] = skipped
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ units
    def run(self, u: Unit) -> dict:
        return getattr(self, f"_{u.kind}")(u)

    def _baseline(self, u: Unit) -> dict:
        return self.evaluate(self.records, probes=True)

    def _singular(self, u: Unit) -> dict:
        """Each record of the chunk edited alone on the unedited model: the chunk's keys and values
        in one batched computation (a value store shares them between methods), the closed
        forms as independent groups of one (rank-one factors; a fine-tuned method's dense
        update is edited, factored and restored one record at a time)."""
        from pmedit.groups import independent_updates

        cs = self.cfg.chunk_size
        idx = range(u.index * cs, min((u.index + 1) * cs, len(self.records)))
        ed = self.editor(u.method, u.layer)
        t0 = time.perf_counter()
        up = independent_updates(ed, [self.requests[i] for i in idx], 1)
        factors = up.factors  # (U [d_out, r], V [d, r]) per edit: r = 1 for the closed forms
        edit_s = time.perf_counter() - t0
        W = ed.spec.down_proj(self.model, u.layer)
        if all(U.shape[1] == 1 for U, _ in factors):
            edits = RankOneEdits(W, torch.stack([U[:, 0] for U, _ in factors]), torch.stack([V[:, 0] for _, V in factors]))
        else:
            edits = GroupDeltas(W, factors)
        # Perplexity and GE of the model one singular edit makes (the chunk's first record), in the
        # first chunk only: a rank-one edit barely moves them, and scoring every edit's model would
        # cost more than the sweep itself.
        out = self.evaluate([self.records[i] for i in idx], edits=edits, with_ppl=u.index == 0)
        rep = up.report
        out.update(edit_seconds=edit_s, seconds_values=rep.seconds_values, seconds_keys=rep.seconds_keys,
                   seconds_solve=rep.seconds_solve, unconverged=len(rep.unconverged),
                   value_steps_mean=sum(rep.value_steps) / max(len(rep.value_steps), 1))
        return out

    def _batch(self, u: Unit, **hp_changes) -> dict:
        ed = self.editor(u.method, u.layer, **hp_changes)
        if self.cfg.batch_protocol == "independent":
            return self._independent(ed, u)
        try:
            t0 = time.perf_counter()
            rep = ed.edit(self.requests[: u.batch_size], batch_size=u.batch_size)
            edit_s = time.perf_counter() - t0
            out = self.evaluate(self.records[: u.batch_size], probes=True)
            out["edit_seconds"] = edit_s
            out["update_norm"] = rep.batches[-1].update_norms.get(u.layer)
        finally:
            ed.restore()
        return out

    def _independent(self, ed, u: Unit) -> dict:
        """All records, in N/B independent batches on the unedited model, each record scored
        under its own batch's update (pmedit.groups; nothing is written)."""
        from pmedit.groups import independent_updates

        t0 = time.perf_counter()
        up = independent_updates(ed, self.requests, u.batch_size)
        edit_s = time.perf_counter() - t0
        edits = GroupDeltas(ed.spec.down_proj(self.model, u.layer), up.factors)
        out = self.evaluate(self.records, edits=edits, groups=up.group_of(len(self.records)))
        rep = up.report
        out.update(up.key_energy)
        out.update(n_edits=len(self.records), edit_seconds=edit_s, seconds_values=rep.seconds_values, seconds_keys=rep.seconds_keys,
                   seconds_solve=rep.seconds_solve, store_hits=rep.extra.get("store_hits", 0),
                   n_groups=len(up.factors), unconverged=len(rep.unconverged),
                   value_steps_mean=sum(rep.value_steps) / max(len(rep.value_steps), 1))
        out.pop("records", None)  # the summary is what the batch experiment reports
        return out

    def _lambda(self, u: Unit) -> dict:
        return self._batch(u, **{get_method(u.method).sweep_field: u.lam})

    def _seq(self, u: Unit) -> dict:
        name = f"{u.method}_S{u.batch_size}"
        b = u.batch_size
        if self._open_seq is None or self._open_seq[0] != name:
            self._close_seq()
            self._open_seq = (name, self._start_seq(name, u))
        ed = self._open_seq[1]
        t0 = time.perf_counter()
        ed.edit(self.requests[u.index * b : (u.index + 1) * b], batch_size=b)
        edit_s = time.perf_counter() - t0
        done = (u.index + 1) * b
        out: dict[str, Any] = {"n_edits": done, "edit_seconds": edit_s}
        if done in _seq_eval_counts(self.cfg, b):
            recs = self.records[:done]
            if self.cfg.eval.max_records is not None and done > self.cfg.eval.max_records:
                recs = select(recs, self.cfg.eval.max_records, seed=self.cfg.seed)  # a fixed-size sample of the edits so far
            out.update(self.evaluate(recs, probes=True))
        last = done >= self.cfg.total_edits
        if last:
            self._close_seq()
        else:
            ed.save_deltas(self._ckpt(name, done))
        # The state records this unit after we return; until then the checkpoint it resumes
        # from (u.index·b edits) must stay, so only older ones go (all of them at the end).
        self._remove_ckpts(name, keep=lambda n: not last and n >= u.index * b)
        return out

    def _ckpt(self, name: str, n_edits: int) -> Path:
        return self.store.checkpoint_path(f"{name}.{n_edits}")

    def _remove_ckpts(self, name: str, keep) -> None:
        for p in self._ckpt(name, 0).parent.glob(f"{name}.*.safetensors"):
            n = p.name[len(name) + 1:-len(".safetensors")]
            if n.isdigit() and not keep(int(n)):
                p.unlink(missing_ok=True)

    def _start_seq(self, name: str, u: Unit):
        """A fresh Editor for the first batch, else the Editor continued from the checkpoint
        the run state expects (a later one, left by a kill before the state was written, is
        ignored and replaced)."""
        from pmedit.editor import Editor

        if u.index == 0:
            return self.editor(u.method, u.layer)
        want = u.index * u.batch_size
        path = self._ckpt(name, want)
        if not path.is_file():
            raise RuntimeError(f"{path}: checkpoint of a sequence in progress is missing; delete the run to restart it")
        ed = Editor.load_deltas(self.model, path, tokenizer=self.tok, hparams=self.hparams(u.method, u.layer),
                                second_moments=self._c0(u.layer), progress=False)
        if ed.n_edits != want:
            ed.restore()
            raise RuntimeError(f"{path}: checkpoint holds {ed.n_edits} edits, the run state expects {want}")
        log.info("resumed %s at %d edits", name, want)
        return ed

    def _close_seq(self) -> None:
        if self._open_seq is not None:
            self._open_seq[1].restore()
            self._open_seq = None


def _value_store(cfg: ExperimentConfig):
    """The run's key/value store: ``"default"`` is shared by every run on this machine
    (``PMEDIT_CACHE/values``; entries are keyed by model, layer, settings and request, so
    sharing is safe), a path is its own store, None computes everything afresh."""
    if cfg.value_store is None:
        return None
    from pmedit.models import cache_root
    from pmedit.value_store import ValueStore

    return ValueStore(cache_root() / "values" if cfg.value_store == "default" else Path(cfg.value_store))


@contextlib.contextmanager
def _first_group(edits):
    """Group 0's update written into the weight (restored exactly after): perplexity of an
    independent-batches run is that of the model its first batch edits."""
    if not isinstance(edits, GroupDeltas) or not len(edits):
        yield
        return
    W = edits.module.weight
    saved = W.detach().clone()
    try:
        with torch.no_grad():
            W.copy_((W.double() + edits.U[0].double() @ edits.V[0].double().mT).to(W.dtype))
        yield
    finally:
        with torch.no_grad():
            W.copy_(saved)


# ------------------------------------------------------------------------------ entry


def _run_dir(cfg: ExperimentConfig, out_dir: str | Path | None) -> Path:
    return Path(out_dir or cfg.out_dir or Path("runs") / cfg.experiment)


def run_experiment(
    cfg: ExperimentConfig,
    *,
    model=None,
    tokenizer=None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    on_unit: Callable[[str], None] | None = None,
    second_moments: dict[int, torch.Tensor] | None = None,
    plot: bool = True,
) -> dict:
    """Run (or resume) ``cfg``; write results.json, results.csv and a PNG into the run
    directory and return ``{"rows": [...], "out_dir": ...}``.

    ``model``/``tokenizer``: an already loaded model (else ``cfg.model`` is loaded).
    ``on_unit(key)`` is called after each unit is stored (progress reporting; the tests raise
    from it to simulate an interruption). ``second_moments``: {layer: C0} instead of collected
    statistics (toy runs).
    """
    root = _run_dir(cfg, out_dir)
    store = RunStore(root, cfg.to_dict())
    if model is None:
        from pmedit.models import load_model

        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    elif tokenizer is None:
        raise ValueError("run_experiment: a model was given without its tokenizer")
    units = plan(cfg)
    runner = _Runner(cfg, model, tokenizer, store, progress, second_moments)
    todo = [u for u in units if u.key not in store]
    if second_moments is None and any(u.kind != "baseline" for u in todo):
        # one pass over the corpus for every layer (each Editor would otherwise collect its own)
        from pmedit.stats import load_or_collect

        hp = cfg.edit_hparams(cfg.methods[0])
        load_or_collect(model, tokenizer, list(cfg.layers), corpus=hp.mom2_corpus, max_tokens=hp.mom2_tokens,
                        progress=progress)
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=cfg.experiment, unit="unit", disable=not progress)
    try:
        for u in todo:
            bar.set_postfix_str(u.key)
            res = runner.run(u)
            store.put(u.key, res)
            bar.update(1)
            if on_unit is not None:
                on_unit(u.key)
    finally:
        runner._close_seq()  # never leave the caller's model edited
        bar.close()
    rows = collect_rows(cfg, units, store.units)
    return write_results(cfg, root, rows, plot, value_store=store_summary(runner.value_store),
                          conflicts_dropped=runner.n_conflicts_dropped,
                          units={"done": len(units), "total": len(units)})


def report_experiment(cfg: ExperimentConfig, *, out_dir: str | Path | None = None, plot: bool = True) -> dict:
    """Write results.json, results.csv and the PNG of the units ``cfg``'s run directory has
    finished so far, without loading a model or running anything, so a run that takes several
    sessions (or is still running) can be read and committed part by part. A row appears once
    its unit is done; ``units`` in the result says how far the run has come. The state is only
    read: a run in progress may go on, and overwrites these files when it ends."""
    root = _run_dir(cfg, out_dir)
    if not (root / "state.json").is_file():
        raise FileNotFoundError(f"{root}: no run state (state.json) to report; run the experiment first")
    store = RunStore(root, cfg.to_dict())  # refuses a directory that holds a run of another config
    units = plan(cfg)
    done = sum(u.key in store for u in units)
    rows = collect_rows(cfg, units, store.units)
    return write_results(cfg, root, rows, plot, units={"done": done, "total": len(units)})
