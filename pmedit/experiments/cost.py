"""What an experiment costs, counted in tokens and FLOPs, and what that means on other hardware.

The batch-size study was run here on SmolLM2 and a CPU; what a user wants to know is what the
same configs cost on Llama-3-8B and a GPU. Wall time does not transfer between those, but the
work does: every phase processes a countable number of tokens (value optimisation: rows × Adam
steps; scoring: the CounterFact sequences; perplexity; GE generation), and a token's cost is a
property of the model (≈ 2 × parameters per forward, 3× that with a backward). This module
counts each phase's tokens from a config exactly as the runner samples and encodes them, turns
them into FLOPs for any Llama-shaped model, and divides by an accelerator's effective rate.
Measured run times give the same ratio on the machine that ran them (``calibrate``): seconds
per token and effective FLOP/s per phase, which is how far such an estimate can be trusted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pmedit.experiments.config import ExperimentConfig


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped decoder: what its per-token FLOPs depend on."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def layer_params(self) -> int:
        kv = self.hidden * self.kv_heads // self.heads
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def weight_bytes_bf16(self) -> int:
        return 2 * (self.layers * self.layer_params + 2 * self.head_params)

    @classmethod
    def from_hf_config(cls, c) -> Shape:
        return cls(c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads, c.vocab_size)


LLAMA3_8B = Shape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256)


@dataclass(frozen=True)
class Accelerator:
    """Peak rates and the fraction of the bf16 peak these small, short-sequence passes reach."""

    name: str
    bf16_flops: float
    fp64_flops: float
    hbm_bytes_s: float
    utilisation: float = 0.35


H100_SXM = Accelerator("H100 SXM", bf16_flops=989e12, fp64_flops=67e12, hbm_bytes_s=3.35e12)


@dataclass
class Work:
    """Token counts of one experiment config (SmolLM2's tokenizer; Llama-3's 128k vocabulary
    needs somewhat fewer tokens for the same English text, so counts are slightly high)."""

    experiment: str
    layer_of_edits: float  # mean edited layer over the value rows' tokens (a layer sweep spans several)
    value_optimisations: int  # computed ones: the store serves every repeat on unedited weights
    value_row_tokens: int  # Σ over those edits of the tokens of all their rows (one step)
    value_target_tokens: int  # Σ target tokens (where logits are needed each step)
    value_steps: float  # Adam steps (+1 final loss evaluation) per edit
    key_row_tokens: int  # keys: rows up to the edited layer, once per edited batch
    scored_records: int
    score_tokens: int  # Σ over scored units of their CounterFact sequences' tokens
    ppl_tokens: int
    ge_passes: int  # units at which GE runs
    ge_prompts: int  # prompts per GE pass
    gen_length: int
    groups: list[tuple[int, int]]  # (batch size, number of groups) over all closed-form solves

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_work(cfg: ExperimentConfig, tok, templates: list[str], records=None) -> Work:
    """The tokens each phase of ``cfg`` processes, as the runner plans its units (value
    optimisations counted once per distinct (record, layer, unedited weights), as the value
    store serves them)."""
    from pmedit.data import select
    from pmedit.evaluation.counterfact import _kinds
    from pmedit.evaluation.registry import load_dataset
    from pmedit.evaluation.scoring import PairEncoder
    from pmedit.experiments.runner import _seq_eval_counts, plan
    from pmedit.requests import drop_conflicts, normalize_requests
    from pmedit.values import KL_TEMPLATE, _encode

    if records is None:
        recs = load_dataset(cfg.dataset, cfg.data)
        drop = set(drop_conflicts(recs)[1])
        records = select([r for i, r in enumerate(recs) if i not in drop], cfg.total_edits, seed=cfg.seed)
    reqs = normalize_requests([r.as_memit_dict() for r in records])
    enc = [_encode(tok, q, templates, KL_TEMPLATE) for q in reqs]
    row_tok = [sum(len(r.ids) for r in e.rows) + len(e.kl.ids) for e in enc]
    tgt_tok = [sum(len(r.target_ids) for r in e.rows) + 1 for e in enc]
    key_tok = [sum(len(r.ids) for r in e.rows) for e in enc]
    pe = PairEncoder(tok)
    score_tok = [sum(len(p) + len(t) for _, prompts, new, other in _kinds(rec) for pr in prompts
                     for p, t in (pe(pr, new), pe(pr, other))) for rec in records]
    hp = cfg.edit_hparams(cfg.methods[0])
    units = plan(cfg)
    n = cfg.total_edits
    e = cfg.eval
    values = set()  # (record index, layer, sequence state) of each computed optimisation
    keys = 0
    scored: list[int] = []  # record counts of scored units (edit metrics)
    model_level = 0  # units with perplexity / GE
    groups: list[tuple[int, int]] = []
    for u in units:
        if u.kind == "baseline":
            scored.append(n)
            model_level += 1
        elif u.kind == "singular":
            idx = range(u.index * cfg.chunk_size, min((u.index + 1) * cfg.chunk_size, n))
            values.update((i, u.layer, "unedited") for i in idx)
            keys += sum(key_tok[i] for i in idx)
            scored.append(len(idx))
            groups.append((1, len(idx)))
        elif u.kind in ("batch", "lambda"):
            values.update((i, u.layer, "unedited") for i in range(n))
            keys += sum(key_tok)
            independent = cfg.batch_protocol == "independent"
            scored.append(n if independent else u.batch_size)
            model_level += 1
            groups.append((u.batch_size, n // u.batch_size if independent else 1))
        elif u.kind == "seq":
            b = u.batch_size
            idx = range(u.index * b, (u.index + 1) * b)
            state = "unedited" if u.index == 0 else f"{u.method}/S{b}"
            values.update((i, u.layer, state) for i in idx)
            keys += sum(key_tok[i] for i in idx)
            groups.append((b, 1))
            done = (u.index + 1) * b
            if done in _seq_eval_counts(cfg, b):
                scored.append(min(done, e.max_records or done))
                model_level += 1
    mean_score = sum(score_tok) / len(score_tok)
    return Work(
        experiment=cfg.experiment,
        # FLOPs are linear in the layer, so the token-weighted mean layer gives the exact total
        layer_of_edits=(sum(row_tok[i] * layer for i, layer, _ in values) / max(sum(row_tok[i] for i, _, _ in values), 1)
                        if values else float(cfg.layers[0])),
        value_optimisations=len(values),
        value_row_tokens=sum(row_tok[i] for i, _, _ in values),
        value_target_tokens=sum(tgt_tok[i] for i, _, _ in values),
        value_steps=float(hp.steps + 1), key_row_tokens=keys,
        scored_records=sum(scored), score_tokens=round(mean_score * sum(scored)),
        ppl_tokens=e.ppl_tokens * model_level if e.perplexity else 0,
        ge_passes=model_level if e.ge_data else 0, ge_prompts=e.ge_records * e.max_gen_prompts, gen_length=e.gen_length,
        groups=groups,
    )


def flops(w: Work, shape: Shape, layer: int | None = None, value_steps: float | None = None) -> dict[str, float]:
    """FLOPs per phase on ``shape`` with edits at ``layer`` (default: the config's). Values: the
    rows' forward up to the layer once, then per step forward + backward (3× forward) through
    the layers above and the LM head at the target positions (pmedit's cached engine); keys:
    forward up to the layer; scoring and perplexity: forward through everything; GE: one
    forward per generated token; solves: the closed forms' triangular solves and small
    factorisations per group in fp64 (d = the MLP width)."""
    layer = w.layer_of_edits if layer is None else layer
    steps = w.value_steps if value_steps is None else value_steps
    P, H = shape.layer_params, shape.head_params
    above = max(shape.layers - layer - 1, 0.0)
    full = 2 * (shape.layers * P + H)
    d = shape.intermediate
    solve = sum(g * (2 * d * d * b + 2 * d * b * b + b ** 3 / 3) for b, g in w.groups)
    return {
        "values": 2 * P * (layer + 1) * w.value_row_tokens + steps * (6 * P * above * w.value_row_tokens
                                                                     + 6 * H * w.value_target_tokens),
        "keys": 2 * P * (layer + 1) * w.key_row_tokens,
        "scoring": full * w.score_tokens,
        "ppl": full * w.ppl_tokens,
        "ge": full * w.ge_passes * w.ge_prompts * w.gen_length,
        "solves_fp64": solve,
    }


def seconds_on(w: Work, shape: Shape, acc: Accelerator, **kw) -> dict[str, float]:
    """Estimated seconds per phase: FLOPs at ``utilisation`` of the bf16 peak (fp64 peak for the
    solves); GE decoding is bound by reading the weights once per generated token of a batch
    of 32 prompts when that is slower."""
    f = flops(w, shape, **kw)
    rate = acc.bf16_flops * acc.utilisation
    out = {k: v / rate for k, v in f.items() if k != "solves_fp64"}
    out["solves"] = f["solves_fp64"] / (acc.fp64_flops * acc.utilisation)
    decode = w.ge_passes * -(-w.ge_prompts // 32) * w.gen_length * shape.weight_bytes_bf16 / acc.hbm_bytes_s
    out["ge"] = max(out["ge"], decode)
    out["total"] = sum(out.values())
    return out


def calibrate(w: Work, shape: Shape, rows: list[dict]) -> dict[str, float | None]:
    """Effective GFLOP/s and µs per token of the run that produced ``rows`` (results.json rows
    of the same config) on the machine it ran on: values (optimisation and keys; measured as
    the rows' seconds_values + seconds_keys, or edit_seconds where the split is absent) and
    evaluation (scoring, perplexity and GE together, the rows' eval_seconds)."""
    steps = [r["value_steps_mean"] for r in rows if r.get("value_steps_mean")]
    used = (sum(steps) / len(steps) + 1) if steps else w.value_steps
    f = flops(w, shape, value_steps=used)
    edit = sum((r.get("seconds_values") or 0) + (r.get("seconds_keys") or 0) if r.get("seconds_values") is not None
               else (r.get("edit_seconds") or 0) for r in rows)
    ev = sum(r.get("eval_seconds") or 0 for r in rows)
    ev_flops = f["scoring"] + f["ppl"] + f["ge"]
    ev_tokens = w.score_tokens + w.ppl_tokens + w.ge_passes * w.ge_prompts * w.gen_length
    return {
        "value_seconds": edit, "eval_seconds": ev,
        "value_gflops_s": f["values"] / edit / 1e9 if edit else None,
        "value_us_per_row_token_step": 1e6 * edit / (w.value_row_tokens * used) if edit else None,
        "eval_gflops_s": ev_flops / ev / 1e9 if ev else None,
        "eval_us_per_token": 1e6 * ev / ev_tokens if ev and ev_tokens else None,
        "value_steps_measured": (sum(steps) / len(steps)) if steps else None,
    }
