"""Held-out perplexity of a model (before/after editing) on text it was not given for C0.

Not here: the statistics corpus (pmedit.corpus), which must not be the text scored here.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from pmedit.fileio import read_text
from pmedit.tokens import encode_documents, pad_batch, pad_id

__all__ = ["perplexity", "load_heldout_text"]


def load_heldout_text(path: str | Path, *, max_chars: int | None = None) -> list[str]:
    """Paragraphs of a held-out text file: WikiText raw (``.raw``/``.txt``; headings and blank
    lines dropped) or JSON lines with a ``text`` field. Do not pass the C0 corpus here."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    texts: list[str] = []
    total = 0
    for ln, line in enumerate(read_text(p, what="held-out text").split("\n"), 1):
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
    ids = encode_documents(tok, ["\n\n".join(texts)], special_tokens=False)[0][:max_tokens]
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
        x, mask = pad_batch(batch, pad_id(tok), device)
        hidden = decoder(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state
        for r, c in enumerate(batch):  # one row at a time keeps the [T, vocab] logits small
            logp = torch.log_softmax(head(hidden[r, : len(c) - 1]).float(), dim=-1)
            tgt = torch.tensor(c[1:], device=device)
            total_nll += -logp.gather(1, tgt[:, None]).double().sum().item()
            count += len(c) - 1
    return {"ppl": math.exp(total_nll / count), "nll": total_nll / count, "tokens": count}
