"""LocFT-BF: breadth-first localized fine-tuning of one MLP weight (Yang et al., ICLR 2026,
"Fine-tuning Done Right in Model Editing"; code: github.com/ICT-STAR/LocFT).

No keys, values or C0: the tuned weight (``down_proj`` of each edited layer) is trained with
Adam on the edits themselves, **breadth-first**: each epoch shuffles all requests of the batch
and steps once per mini-batch of ``minibatch_size``, up to ``epochs`` epochs, stopping after
the first epoch whose mean loss is below ``ft_loss_stop``. The loss of a sequence is the mean
NLL of its target tokens only (prompt and padding masked), with EOS appended to the target as
the authors do; a mini-batch's loss is the mean over its sequences, and a mini-batch whose loss
is already below ``ft_loss_stop`` takes no step (the authors' rule). Gradients reach only the
tuned weights: every other parameter is frozen for the run and its ``requires_grad`` restored.

Atomicity: training moves the weight in place (the forward pass must see it), so the start
weight is copied first and always put back, then the trained change goes in as one Δ through
``ctx.write`` (checked). A NaN loss or Ctrl-C therefore leaves the model as it was. 16-bit
weights are trained through an fp32 master copy (Adam's ε = 1e-8 is 0 in fp16).

Shuffling is ``torch.randperm`` on a generator seeded with ``seed`` (one generator per batch,
so each batch of a sequential run is its own breadth-first run, reproducible alone).

Differences from the authors' code, on purpose: sequences are right-padded (positions count
from 0 as in unpadded inference; theirs are left-padded without position ids, which shifts
the positions of short prompts); logits are computed only at the scored positions; the
tokenisation is pmedit.tokens' (leading space, no stray BOS in targets); several layers may
be tuned together (theirs: one).

Not here: the orchestration (pmedit.editor), scoring (pmedit.evaluation).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pmedit.hparams import EditHparams
from pmedit.methods.base import EditContext, EditError, Method

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LocftHparams(EditHparams):
    """The authors' defaults (hparams/llama3-8b.yaml and fine-tune.py): Adam at lr 5e-4, no
    weight decay, mini-batches of 100, 25 epochs, stop below 1e-2, EOS appended.

    The value-optimisation and statistics fields inherited from EditHparams are not used.
    """

    method: str = "locft-bf"
    ft_lr: float = 5e-4
    ft_weight_decay: float = 0.0
    epochs: int = 25
    minibatch_size: int = 100
    ft_loss_stop: float = 1e-2
    append_eos: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ft_lr > 0:
            raise ValueError(f"EditHparams field 'ft_lr': must be > 0, got {self.ft_lr!r}")
        if not self.ft_lr <= 1.0:
            raise ValueError(f"EditHparams field 'ft_lr': {self.ft_lr!r} is above 1; Adam moves every weight by "
                             "about lr per step, so this would overwrite the layer (the authors use 5e-4)")
        for name in ("ft_weight_decay", "ft_loss_stop"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"EditHparams field {name!r}: must be >= 0, got {getattr(self, name)!r}")
        for name in ("epochs", "minibatch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EditHparams field {name!r}: must be >= 1, got {getattr(self, name)!r}")
        if self.seed < 0:
            raise ValueError(f"EditHparams field 'seed': must be >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class TrainSeq:
    """One request as a training sequence: input ids, and the labels scored at ``first``,
    ``first + 1``, ... (the target's ids, then EOS when appended)."""

    ids: list[int]
    labels: list[int]
    first: int


def encode_requests(tok, reqs: list, *, append_eos: bool) -> list[TrainSeq]:
    """Training sequences of ``reqs`` (prompt + target [+ EOS]) through pmedit.tokens.

    Errors name the request: a target that tokenizes to nothing, a tokenizer without EOS.
    """
    from pmedit.tokens import encode_rewrite

    eos = getattr(tok, "eos_token_id", None)
    if append_eos and eos is None:
        raise ValueError("LocFT-BF appends EOS to every target (append_eos=true), but the tokenizer has no "
                         "eos_token_id; set append_eos=false or use a tokenizer with an EOS token")
    out = []
    for i, r in enumerate(reqs):
        try:
            enc = encode_rewrite(tok, r, None)
        except ValueError as e:
            raise ValueError(f"request {i} (case_id={r.case_id!r}): {e}") from None
        if append_eos:
            out.append(TrainSeq(enc.ids + enc.target_ids[-1:], enc.target_ids + [int(eos)], enc.first_scored))
        else:
            out.append(TrainSeq(list(enc.ids), list(enc.target_ids), enc.first_scored))
    return out


def sequence_losses(model, seqs: list[TrainSeq], pad: int, device) -> torch.Tensor:
    """Mean NLL of each sequence's labels [n] (≥ fp32, differentiable): one right-padded forward
    pass, logits only at the scored positions."""
    from pmedit.tokens import pad_batch

    ids, mask = pad_batch([s.ids for s in seqs], pad, device)
    rows, cols, tgts, weights = [], [], [], []
    for r, s in enumerate(seqs):
        rows += [r] * len(s.labels)
        cols += range(s.first, s.first + len(s.labels))
        tgts += s.labels
        weights += [1.0 / len(s.labels)] * len(s.labels)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    rows_t, tgts_t = as_long(rows), as_long(tgts)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=None if bool(mask.all()) else mask,
                                 use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    logits = head(hidden[rows_t.to(hidden.device), as_long(cols).to(hidden.device)]).to(device)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # 16-bit logits: NLL in fp32
    # logsumexp − target logit: the NLL without a second [tokens, vocab] tensor
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, tgts_t[:, None]).squeeze(1)
    per_tok = nll * torch.tensor(weights, device=device, dtype=nll.dtype)
    return torch.zeros(len(seqs), device=device, dtype=per_tok.dtype).index_add(0, rows_t, per_tok)


@dataclass
class TrainResult:
    epoch_losses: list[float]  # mean over requests of their (pre-step) loss, per epoch run
    steps: int  # Adam steps taken
    skipped: int  # mini-batches below the threshold, not stepped
    stopped_early: bool
    final_losses: list[float]  # per request, request order, after training
    seconds: float
    trained: list[torch.Tensor] = field(default_factory=list)  # the tuned weights (master precision)


def train(model, tok, tuned: list[torch.nn.Parameter], seqs: list[TrainSeq], hp: LocftHparams, *,
          where: str = "LocFT-BF", case_ids: list | None = None, progress: bool = False) -> TrainResult:
    """The breadth-first loop on ``tuned`` (moved in place; the caller restores or keeps them).

    Every other parameter of ``model`` is frozen meanwhile and the model is in eval mode; both
    are restored afterwards, as is each tuned parameter's ``.grad``.
    """
    from pmedit.tokens import pad_id

    t0 = time.perf_counter()
    device = model.get_input_embeddings().weight.device
    pad = pad_id(tok)
    n = len(seqs)
    case_ids = case_ids if case_ids is not None else list(range(n))
    # fp32/fp64 weights are trained directly; 16-bit ones through an fp32 master copy.
    masters = [p if p.dtype in (torch.float32, torch.float64) else p.detach().float().clone() for p in tuned]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    grads = [p.grad for p in tuned]
    was_training = model.training
    gen = torch.Generator().manual_seed(hp.seed)
    res = TrainResult([], 0, 0, False, [], 0.0)
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in tuned:
            p.requires_grad_(True)
            p.grad = None
        model.eval()
        opt = torch.optim.Adam(masters, lr=hp.ft_lr, weight_decay=hp.ft_weight_decay)
        bar = tqdm(range(hp.epochs), desc=f"{where}: LocFT-BF", unit="epoch", disable=not progress, leave=False)
        with torch.enable_grad(), bar:
            for epoch in bar:
                order = torch.randperm(n, generator=gen).tolist()
                total = 0.0
                for s in range(0, n, hp.minibatch_size):
                    idx = order[s:s + hp.minibatch_size]
                    loss = sequence_losses(model, [seqs[i] for i in idx], pad, device).mean()
                    value = float(loss.detach())
                    if value != value or value in (float("inf"), float("-inf")):
                        raise EditError(f"{where}: LocFT-BF loss is {value} at epoch {epoch + 1}/{hp.epochs}, "
                                        f"mini-batch {s // hp.minibatch_size + 1} (case_ids "
                                        f"{[case_ids[i] for i in idx][:8]}); no weights were changed by this batch")
                    total += value * len(idx)
                    if value < hp.ft_loss_stop:
                        res.skipped += 1
                        continue
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for p, m in zip(tuned, masters):
                        if m is not p:
                            m.grad, p.grad = p.grad.float(), None
                    opt.step()
                    res.steps += 1
                    with torch.no_grad():
                        for p, m in zip(tuned, masters):
                            if m is not p:
                                p.copy_(m)
                res.epoch_losses.append(total / n)
                bar.set_postfix(loss=f"{total / n:.4f}")
                if total / n < hp.ft_loss_stop:
                    res.stopped_early = epoch + 1 < hp.epochs
                    break
        with torch.no_grad():
            for s in range(0, n, hp.minibatch_size):
                res.final_losses += sequence_losses(model, seqs[s:s + hp.minibatch_size], pad, device).tolist()
        bad = [case_ids[i] for i, x in enumerate(res.final_losses) if not abs(x) < float("inf")]
        if bad:
            raise EditError(f"{where}: after LocFT-BF training the loss of {len(bad)} request(s) is non-finite "
                            f"(case_ids {bad[:8]}); no weights were changed by this batch")
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        for p, g in zip(tuned, grads):
            p.grad = g
        model.train(was_training)
    res.seconds = time.perf_counter() - t0
    res.trained = [m.detach() for m in masters]  # unrounded for 16-bit weights
    return res


def edit_batch(ctx: EditContext, reqs: list) -> None:
    hp: LocftHparams = ctx.hparams
    seqs = encode_requests(ctx.tokenizer, reqs, append_eos=hp.append_eos)  # before any training
    tuned = [ctx.weight(layer) for layer in ctx.layers]
    start = [p.detach().clone() for p in tuned]
    try:
        res = train(ctx.model, ctx.tokenizer, tuned, seqs, hp, where=ctx.where,
                    case_ids=[r.case_id for r in reqs], progress=ctx.progress)
        deltas = [w.double() - s.double() for w, s in zip(res.trained, start)]
    finally:
        with torch.no_grad():
            for p, s in zip(tuned, start):
                p.copy_(s)
    for layer, delta in zip(ctx.layers, deltas):
        ctx.write(layer, delta)
    rep = ctx.report
    rep.value_losses.extend(res.final_losses)
    rep.value_steps.extend([len(res.epoch_losses)] * len(reqs))
    rep.extra.update({"locft_epoch_losses": res.epoch_losses, "locft_epochs": len(res.epoch_losses),
                      "locft_steps": res.steps, "locft_skipped_minibatches": res.skipped,
                      "locft_stopped_early": res.stopped_early, "locft_seconds": res.seconds})
    log.debug("%s: LocFT-BF %d epochs, %d steps, epoch losses %s", ctx.where, len(res.epoch_losses), res.steps,
              res.epoch_losses)


METHOD = Method(
    name="locft-bf",
    hparams=LocftHparams,
    edit_batch=edit_batch,
    # lr is the knob that trades edits landing against collateral change (the λ of the
    # closed forms): epochs are cut short by the loss stop, and the mini-batch size only
    # changes the number of steps per epoch.
    sweep_field="ft_lr",
    summary="breadth-first Adam fine-tuning of one layer's down_proj on the edits (target tokens + EOS)",
    presets={
        # The authors' hparams/llama3-8b.yaml: layer 22 of Llama-3-8B-Instruct, lr 5e-4,
        # batch 100, 25 epochs (their num_steps), stop below 1e-2 (hard-coded in fine-tune.py).
        "llama3-8b": {"layers": [22], "ft_lr": 5e-4, "minibatch_size": 100, "epochs": 25, "ft_loss_stop": 1e-2},
        # SmolLM2-135M: layer 2 from a short sweep (benchmarks/RESULTS.md, "locft"; python -m
        # pmedit.bench.locft --layer-sweep): 16 CounterFact edits in one batch, lr 2e-3 (at 5e-4
        # 4 edits end at loss 3.2 after 25 steps: one mini-batch per epoch), 25 epochs, layers
        # 2/4/8/12/16/20/24/27. Layer 2 wrote every edit (ES 100, teacher-forced accuracy 94)
        # and kept neighbours nearly as they were (NS 56.9, unedited 58.1); layer 20 generalised
        # more (PS 53 vs 34) but broke neighbours (NS 20).
        "smollm2": {"layers": [2], "ft_lr": 2e-3},
    },
    uses_preservation=False,
)
