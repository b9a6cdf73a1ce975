"""Evaluate edits on CounterFact: batched target NLLs, generation, perplexity, and the
singular-edit evaluation through per-row rank-one delta hooks.

Speed comes from two choices. Every (prompt, target) pair of many records is one row of a
padded batch, and one forward pass scores the whole target (prompt and target token ids are
concatenated; the logits at the target positions give every target token's NLL), so there is
no loop over prompts or target tokens. And only the target positions go through the output
embedding: on SmolLM2 the 49k-row ``lm_head`` would otherwise dominate a short-prompt batch.

Singular editing (each edit judged alone on the otherwise unedited model, as in the study's
layer sweep) would naively need a weight copy per edit. A one-fact edit of ROME, MEMIT or
EMMET is rank one, Δ = u vᵀ on ``down_proj``, so a forward hook adds ``(x·v_e) u_e`` to the
output of batch row r for that row's own edit e; many edits then share one batch and the
weights are never touched (:class:`RankOneEdits`).

Tokenisation of targets follows the evaluation convention: a leading space and no BOS in the
target ids (`` Paris``), the prompt tokenised as the tokenizer does by itself (with BOS where
it adds one). MEMIT's code tokenised `` target`` *with* special tokens, which on Llama
tokenizers puts a BOS inside the scored sequence; that bug is deliberately not reproduced.

Not here: the metric definitions (:mod:`pmedit.metrics`) and editing itself.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from pmedit.metrics import PromptScores, RecordScores, generation_entropy, record_scores, summarize

log = logging.getLogger(__name__)

__all__ = [
    "target_ids",
    "score_targets",
    "RankOneEdits",
    "rank_one_factors",
    "generate",
    "evaluate_counterfact",
    "EvalResult",
    "perplexity",
    "load_heldout_text",
]


def target_ids(tok, target: str) -> list[int]:
    """Token ids of `` target``: leading space, no special tokens."""
    ids = tok(" " + target.lstrip(" "), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return list(ids)


def prompt_ids(tok, prompt: str) -> list[int]:
    ids = tok(prompt)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
    return list(ids)


# ---------------------------------------------------------------------------------------
# per-row rank-one deltas


class RankOneEdits:
    """E rank-one updates Δ_e = U[e] ⊗ V[e] of one linear module, applied per batch row.

    Used as a context manager: while active, a forward hook on ``module`` adds
    ``(x_r · V[e_r]) U[e_r]`` to row r's output, where ``rows[r] = e_r`` (−1: no edit). The
    scorer sets ``rows`` before each forward pass. Exactly the output of the module with
    weight W + U[e]V[e]ᵀ for that row, up to rounding.
    """

    def __init__(self, module: nn.Module, U: torch.Tensor, V: torch.Tensor):
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2:
            raise ValueError(f"RankOneEdits needs a linear module with a 2-D weight, got {type(module).__name__}")
        d_out, d = w.shape
        if U.dim() != 2 or V.dim() != 2 or U.shape[0] != V.shape[0]:
            raise ValueError(f"U and V must be [E, d_out] and [E, d] with the same E, got {tuple(U.shape)} and {tuple(V.shape)}")
        if U.shape[1] != d_out or V.shape[1] != d:
            raise ValueError(f"U {tuple(U.shape)} / V {tuple(V.shape)} do not match the weight [{d_out}, {d}]")
        self.module = module
        self.U = U.to(device=w.device, dtype=w.dtype)
        self.V = V.to(device=w.device, dtype=w.dtype)
        self.rows: torch.Tensor | None = None
        self._handle = None

    def __len__(self) -> int:
        return self.U.shape[0]

    @property
    def active(self) -> bool:
        return self._handle is not None

    def set_rows(self, rows: Sequence[int] | torch.Tensor) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.U.device)
        if rows.numel() and (rows.max() >= len(self) or rows.min() < -1):
            raise ValueError(f"row edit indices must be in -1..{len(self) - 1}, got {rows.min().item()}..{rows.max().item()}")
        self.rows = rows

    def _hook(self, module, args, output):
        if self.rows is None:
            raise RuntimeError("RankOneEdits: set_rows() was not called before the forward pass")
        x = args[0]
        if x.shape[0] != self.rows.shape[0]:
            raise RuntimeError(f"RankOneEdits: batch has {x.shape[0]} rows but {self.rows.shape[0]} row edits were set")
        has = self.rows >= 0
        idx = self.rows.clamp(min=0)
        V = self.V[idx] * has[:, None].to(self.V.dtype)  # rows without an edit get a zero delta
        U = self.U[idx]
        coef = torch.einsum("b...d,bd->b...", x, V)
        return output + coef.unsqueeze(-1) * U.view(U.shape[0], *([1] * (x.dim() - 2)), U.shape[1])

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.rows = None


def rank_one_factors(delta: torch.Tensor, *, rtol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """u, v with u vᵀ = delta, for a delta that is rank one (a single-edit update).

    From the SVD in fp64: u = σ₁u₁, v = v₁. Refuses a delta whose second singular value is
    above ``rtol``·σ₁: a 1e-4 slack covers fp32 accumulation in the solver (observed ~1e-7)
    while any real second direction (a two-edit batch) is orders of magnitude larger.
    """
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D [d_out, d], got shape {tuple(delta.shape)}")
    d64 = delta.detach().to(torch.float64)
    Us, S, Vh = torch.linalg.svd(d64, full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return torch.zeros(delta.shape[0], dtype=delta.dtype), torch.zeros(delta.shape[1], dtype=delta.dtype)
    if S.numel() > 1 and S[1] > rtol * S[0]:
        raise ValueError(f"delta is not rank one: singular values {S[0].item():.3g}, {S[1].item():.3g}")
    return (Us[:, 0] * S[0]).to(delta.dtype), Vh[0].to(delta.dtype)


def _set_rows(edits: RankOneEdits | None, rows: list[int]) -> None:
    if edits is not None:
        edits.set_rows(rows)


# ---------------------------------------------------------------------------------------
# target scoring


def default_score_batch(device: torch.device) -> int:
    """Sequences per scoring pass: small on a CPU, where activations of a few dozen short
    sequences stay in cache (measured on SmolLM2, 2 cores: 16 per pass ran 1.7x faster than
    64), larger on a GPU, which needs the parallelism."""
    return 16 if torch.device(device).type == "cpu" else 64


@torch.no_grad()
def score_targets(
    model: nn.Module,
    tok,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    edits: RankOneEdits | None = None,
    row_edits: Sequence[int] | None = None,
    batch_size: int | None = None,
    pack: bool | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token NLL of each target after its prompt, and whether every target token is
    the argmax (teacher forcing).

    ``pairs``: (prompt ids, target ids); ``row_edits[i]`` is the edit pair i sees through
    ``edits`` (−1 for none). ``batch_size`` is sequences per forward pass (default: see
    :func:`default_score_batch`). With ``pack`` (default: when the attention implementation takes
    arbitrary 4D masks, i.e. sdpa or eager), pairs that share a prompt and an edit are scored
    in one sequence: the prompt once, then each target, every target attending to the prompt
    and to itself only, its positions restarting where the prompt ends. CounterFact scores
    each prompt against two targets, so this computes about 40% fewer tokens for the same
    numbers. Sequences are sorted by length before batching so padding stays small.
    Returns (nll float64 [N], correct bool [N]) in the order of ``pairs``.
    """
    n = len(pairs)
    if edits is not None and (row_edits is None or len(row_edits) != n):
        raise ValueError("edits need row_edits, one per pair")
    for i, (p, t) in enumerate(pairs):
        if len(p) == 0 or len(t) == 0:
            raise ValueError(f"pair {i}: empty prompt or target ids")
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = default_score_batch(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pack is None:
        pack = getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    decoder = model.get_decoder()
    head = model.get_output_embeddings()

    groups: dict[tuple, list[int]] = {}
    for i, (p, _) in enumerate(pairs):
        key = (tuple(p), row_edits[i] if edits is not None else -1) if pack else (i,)
        groups.setdefault(key, []).append(i)
    seqs = list(groups.values())

    def seq_len(g: list[int]) -> int:
        return len(pairs[g[0]][0]) + sum(len(pairs[i][1]) for i in g)

    order = sorted(range(len(seqs)), key=lambda j: -seq_len(seqs[j]))
    nll_sum = torch.zeros(n, dtype=torch.float64)
    n_tok = torch.zeros(n, dtype=torch.float64)
    wrong = torch.zeros(n, dtype=torch.long)
    for s in tqdm(range(0, len(seqs), batch_size), desc="scoring", disable=not progress, leave=False):
        chunk = [seqs[j] for j in order[s : s + batch_size]]
        width = max(seq_len(g) for g in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        pos = torch.zeros((len(chunk), width), dtype=torch.long)
        seg = torch.full((len(chunk), width), -1, dtype=torch.long)  # -1 padding, 0 prompt, j+1 target j
        rows, cols, tgts, owner = [], [], [], []
        for r, g in enumerate(chunk):
            prompt = list(pairs[g[0]][0])
            plen = len(prompt)
            ids[r, :plen] = torch.tensor(prompt)
            pos[r, :plen] = torch.arange(plen)
            seg[r, :plen] = 0
            o = plen
            for j, i in enumerate(g):
                t = list(pairs[i][1])
                ids[r, o : o + len(t)] = torch.tensor(t)
                pos[r, o : o + len(t)] = torch.arange(plen, plen + len(t))
                seg[r, o : o + len(t)] = j + 1
                rows += [r] * len(t)
                # the logits at a position predict the next token of its own segment
                cols += [plen - 1, *range(o, o + len(t) - 1)]
                tgts += t
                owner += [i] * len(t)
                o += len(t)
        _set_rows(edits, [row_edits[g[0]] for g in chunk] if edits is not None else [])
        if pack:
            ar = torch.arange(width)
            sq, sk = seg[:, :, None], seg[:, None, :]
            allowed = (ar[None, :] <= ar[:, None]) & (sk >= 0) & ((sk == 0) | (sk == sq))
            allowed |= torch.eye(width, dtype=torch.bool) & (sq < 0)  # padding sees itself: no empty softmax row
            # additive form: eager attention adds a custom 4D mask to the scores, sdpa takes either
            dt = next(decoder.parameters()).dtype
            additive = torch.zeros(allowed.shape, dtype=dt).masked_fill_(~allowed, torch.finfo(dt).min)
            kwargs = dict(attention_mask=additive[:, None].to(device), position_ids=pos.to(device))
        else:
            kwargs = dict(attention_mask=(seg >= 0).long().to(device))
        hidden = decoder(input_ids=ids.to(device), use_cache=False, **kwargs).last_hidden_state
        logits = head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]).float()
        logp = torch.log_softmax(logits, dim=-1)
        tg = torch.tensor(tgts, device=device)
        own = torch.tensor(owner)
        nll_sum.index_add_(0, own, -logp.gather(1, tg[:, None])[:, 0].double().cpu())
        n_tok.index_add_(0, own, torch.ones(len(owner), dtype=torch.float64))
        wrong.index_add_(0, own, (logits.argmax(-1) != tg).long().cpu())
    return nll_sum / n_tok, wrong == 0


# ---------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 32,
    edits: RankOneEdits | None = None,
    row_edits: Sequence[int] | None = None,
    force_length: bool = False,
    progress: bool = False,
) -> list[str]:
    """Continuations of ``prompts`` (greedy, or top-k sampling), in batches, left-padded.

    Returns the decoded *continuations* only. ``force_length`` suppresses end-of-sequence so
    every text has exactly ``max_new_tokens`` tokens (MEMIT's fluency texts are fixed-length).
    Sampling runs under a forked RNG seeded with ``seed``, so results are reproducible and the
    caller's RNG is untouched.
    """
    if edits is not None and (row_edits is None or len(row_edits) != len(prompts)):
        raise ValueError("edits need row_edits, one per prompt")
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[str] = [""] * len(prompts)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for s in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False):
            chunk = list(range(s, min(s + batch_size, len(prompts))))
            enc = [prompt_ids(tok, prompts[i]) for i in chunk]
            width = max(len(e) for e in enc)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, e in enumerate(enc):
                ids[r, width - len(e) :] = torch.tensor(e)
                mask[r, width - len(e) :] = 1
            _set_rows(edits, [row_edits[i] for i in chunk] if edits is not None else [])
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, do_sample=do_sample)
            if do_sample:
                kwargs.update(top_k=top_k, top_p=1.0, temperature=1.0)
            else:
                kwargs.update(top_k=None, top_p=None, temperature=None)
            if force_length:
                kwargs["min_new_tokens"] = max_new_tokens
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for r, i in enumerate(chunk):
                out[i] = tok.decode(gen[r, width:], skip_special_tokens=True)
    return out


# ---------------------------------------------------------------------------------------
# CounterFact


@dataclass
class EvalResult:
    records: list[RecordScores]
    summary: dict
    texts: dict | None = None  # case_id -> generated fluency texts, when GE was measured

    def to_dict(self) -> dict:
        return {"summary": self.summary, "records": [r.to_dict() for r in self.records]}


def _kinds(rec) -> list[tuple[str, list[str], str, str]]:
    """(kind, prompts, expected target, the other target) of a record."""
    return [
        ("rewrite", [rec.rewrite_prompt], rec.target_new, rec.target_true),
        ("paraphrase", list(rec.paraphrase_prompts), rec.target_new, rec.target_true),
        ("neighborhood", list(rec.neighborhood_prompts), rec.neighborhood_target, rec.target_new),
    ]


@torch.no_grad()
def evaluate_counterfact(
    model: nn.Module,
    tok,
    records: Sequence,
    *,
    edits: RankOneEdits | None = None,
    batch_size: int | None = None,
    generation_accuracy: bool = False,
    entropy: bool = False,
    max_gen_prompts: int | None = None,
    gen_length: int = 100,
    gen_batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> EvalResult:
    """ES/PS/NS (+ magnitudes, teacher-forced accuracy), optionally generation accuracy and GE.

    ``edits``: per-record rank-one deltas (record i sees only ``edits`` row i) for singular-edit
    evaluation; None scores the model as it is. Generation accuracy: the greedy continuation of
    the rewrite prompt (as many tokens as the new target has, plus 3) contains ``target_new``.
    GE: each of the record's generation prompts (at most ``max_gen_prompts``) continued by
    top-k-5 sampling to ``gen_length`` new tokens (MEMIT: 100); entropy of prompt+continuation.
    """
    if edits is not None and len(edits) != len(records):
        raise ValueError(f"edits holds {len(edits)} deltas for {len(records)} records")
    with contextlib.ExitStack() as stack:
        if edits is not None and not edits.active:
            stack.enter_context(edits)
        return _evaluate_counterfact(
            model, tok, records, edits=edits, batch_size=batch_size, generation_accuracy=generation_accuracy,
            entropy=entropy, max_gen_prompts=max_gen_prompts, gen_length=gen_length,
            gen_batch_size=gen_batch_size, seed=seed, progress=progress,
        )


def _evaluate_counterfact(
    model, tok, records, *, edits, batch_size, generation_accuracy, entropy, max_gen_prompts, gen_length,
    gen_batch_size, seed, progress,
) -> EvalResult:
    pairs, owner = [], []  # owner: (record, kind, prompt index, is_new)
    tid_cache: dict[str, list[int]] = {}

    def tids(s: str) -> list[int]:
        if s not in tid_cache:
            tid_cache[s] = target_ids(tok, s)
        return tid_cache[s]

    for ri, rec in enumerate(records):
        for kind, prompts, _, _ in _kinds(rec):
            for pi, prompt in enumerate(prompts):
                pids = prompt_ids(tok, prompt)
                pairs.append((pids, tids(rec.target_new)))
                owner.append((ri, kind, pi, True))
                true = rec.neighborhood_target if kind == "neighborhood" else rec.target_true
                pairs.append((pids, tids(true)))
                owner.append((ri, kind, pi, False))
    row_edits = [o[0] for o in owner] if edits is not None else None
    nll, correct = score_targets(model, tok, pairs, edits=edits, row_edits=row_edits, batch_size=batch_size, progress=progress)

    per: list[dict[str, PromptScores]] = [
        {k: PromptScores([], [], []) for k in ("rewrite", "paraphrase", "neighborhood")} for _ in records
    ]
    for j, (ri, kind, _pi, is_new) in enumerate(owner):
        ps = per[ri][kind]
        if is_new:
            ps.nll_new.append(nll[j].item())
            if kind != "neighborhood":
                ps.correct.append(bool(correct[j]))
        else:
            ps.nll_true.append(nll[j].item())
            if kind == "neighborhood":
                ps.correct.append(bool(correct[j]))
    scores = [
        record_scores(p["rewrite"], p["paraphrase"], p["neighborhood"], case_id=getattr(rec, "case_id", None))
        for p, rec in zip(per, records)
    ]

    if generation_accuracy:
        n_new = max(len(tids(r.target_new)) for r in records) + 3
        conts = generate(
            model, tok, [r.rewrite_prompt for r in records], max_new_tokens=n_new, batch_size=gen_batch_size,
            edits=edits, row_edits=list(range(len(records))) if edits is not None else None, progress=progress,
        )
        for sc, rec, c in zip(scores, records, conts):
            sc.generation_correct = rec.target_new in c

    texts = None
    if entropy:
        prompts, who = [], []
        for ri, rec in enumerate(records):
            gp = list(rec.generation_prompts)[: max_gen_prompts]
            prompts += gp
            who += [ri] * len(gp)
        if prompts:
            conts = generate(
                model, tok, prompts, max_new_tokens=gen_length, do_sample=True, top_k=5, seed=seed,
                batch_size=gen_batch_size, edits=edits, row_edits=who if edits is not None else None,
                force_length=True, progress=progress,
            )
            texts = {}
            for ri in sorted(set(who)):
                ts = [p + c for p, c, w in zip(prompts, conts, who) if w == ri]
                scores[ri].entropy = generation_entropy(ts)
                texts[getattr(records[ri], "case_id", ri)] = ts
    return EvalResult(records=scores, summary=summarize(scores), texts=texts)


# ---------------------------------------------------------------------------------------
# perplexity


def load_heldout_text(path: str | Path, *, max_chars: int | None = None) -> list[str]:
    """Paragraphs of a held-out text file: WikiText raw (``.raw``/``.txt``; headings and blank
    lines dropped) or JSON lines with a ``text`` field. Do not pass the C0 corpus here."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    texts: list[str] = []
    total = 0
    with open(p, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if p.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}: line {ln}: invalid JSON: {e.msg}") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{p}: line {ln}: field 'text': missing or not a string")
                t = obj["text"].strip()
            else:
                t = line.strip()
                if t.startswith("=") and t.endswith("="):
                    continue
            if t:
                texts.append(t)
                total += len(t)
                if max_chars is not None and total >= max_chars:
                    break
    if not texts:
        raise ValueError(f"{p}: no text found")
    return texts


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tok,
    texts: Sequence[str],
    *,
    max_tokens: int = 20_000,
    window: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """exp(mean NLL) over the first ``max_tokens`` tokens of the texts (joined by blank lines),
    in non-overlapping windows of ``window`` tokens each scored on its tokens 2..window.

    Non-overlapping windows understate long-range context, which is fine for a before/after
    comparison of the same model on the same windows.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"][:max_tokens]
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise ValueError("perplexity: the texts hold fewer than 2 tokens")
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    total_nll, count = 0.0, 0
    for s in tqdm(range(0, len(chunks), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = chunks[s : s + batch_size]
        width = max(len(c) for c in batch)
        x = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, c in enumerate(batch):
            x[r, : len(c)] = torch.tensor(c)
            mask[r, : len(c)] = 1
        hidden = decoder(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for r, c in enumerate(batch):  # one row at a time keeps the [T, vocab] logits small
            logp = torch.log_softmax(head(hidden[r, : len(c) - 1]).float(), dim=-1)
            tgt = torch.tensor(c[1:], device=device)
            total_nll += -logp.gather(1, tgt[:, None]).double().sum().item()
            count += len(c) - 1
    return {"ppl": math.exp(total_nll / count), "nll": total_nll / count, "tokens": count}

