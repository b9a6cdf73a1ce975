"""Token ids for edit requests, with the pitfalls of the research code handled in one place.

Value optimisation scores ``target_new`` as a continuation of a prompt, and keys/values are read
at the subject's last token; both go wrong silently when tokenization is careless:

- **BOS in targets.** Llama-3's tokenizer prepends ``<|begin_of_text|>`` to every call, so
  ``tok(" English")`` is two ids and the reference code then trains the model to emit BOS
  after the prompt. Target ids here are encoded without special tokens and any BOS/EOS that a
  tokenizer still adds is removed (SmolLM2 adds none; both behaviours are tested).
- **The leading space.** BPE vocabularies spell a word after a space differently (``"is"`` +
  ``" English"``); the prompt is right-stripped and the target gets one leading space (or
  keeps the whitespace it was given), so prompt and target ids concatenate to what the model
  would see in running text.
- **Where the subject ends.** The subject's last token is found from character offsets in the
  tokenization of the whole prompt, never by tokenizing the prefix separately, because a
  tokenizer may merge the subject's last characters with the text after it (``"{}ball"`` with
  subject "Foot"); then the merged token is the subject's last token. Without offsets (slow
  tokenizers) the position is found by decoding growing prefixes of the ids.
- Prompt ids keep the special tokens the tokenizer prepends (the model was trained with BOS)
  but drop any it appends (an EOS after the prompt would end the text the target continues).

- **Padding.** Every batch is padded by :func:`pad_batch` with the id :func:`pad_id` picks
  (the tokenizer's pad id, else EOS, else 0). Padded positions are masked, so the id never
  changes a score; one rule keeps batches identical wherever they are built.

Not here: which prompts an edit uses (pmedit.keys / pmedit.values) and request validation
(pmedit.requests).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from string import Formatter

import torch

from pmedit.requests import EditRequest


def pad_id(tok) -> int:
    """The one pad-id rule: the tokenizer's pad id, else its EOS id, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    return 0


def pad_batch(seqs: Sequence[Sequence[int]], pad: int, device=None, *, side: str = "right"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids [n, max_len] and attention mask (long, 1 on real tokens).

    Right padding (the default: scoring, keys, values, statistics) keeps positions counted from
    the left, so a token's index in its own sequence is its index in the batch row; left padding
    is for generation, where every row must end at the last column.
    """
    if side not in ("right", "left"):
        raise ValueError(f"pad_batch: side must be 'right' or 'left', got {side!r}")
    if not seqs:
        raise ValueError("pad_batch: no sequences")
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def encode_documents(tok, texts: Sequence[str], *, max_length: int | None = None,
                     special_tokens: bool = True) -> list[list[int]]:
    """Ids of whole documents (statistics corpora, perplexity text), in one batched call.

    ``special_tokens`` keeps what the tokenizer adds (BOS where the model was trained with it);
    ``max_length`` truncates each document.
    """
    kw = {"truncation": True, "max_length": int(max_length)} if max_length else {}
    return [list(ids) for ids in tok(list(texts), add_special_tokens=special_tokens, **kw)["input_ids"]]


def split_target(prompt: str, target: str) -> tuple[str, str]:
    """``(prompt, continuation)`` with the whitespace between them moved onto the target.

    "The mother tongue of X is" + "English" → ("... is", " English"). A prompt ending in
    whitespace ("... is ") gives that whitespace to the target, so the boundary is tokenized as
    in running text either way.
    """
    stripped = prompt.rstrip()
    gap = prompt[len(stripped):]
    if target[:1].isspace():
        return stripped, target
    return stripped, (gap or " ") + target


def _special_ids(tok) -> set[int]:
    ids = set(getattr(tok, "all_special_ids", None) or [])
    for name in ("bos_token_id", "eos_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            ids.add(int(v))
    return ids


def _own_ids(tok, text: str, offsets: bool = False) -> tuple[list[int], list | None]:
    """The text's own ids (and offsets): no special tokens, even from tokenizers that add them
    with ``add_special_tokens=False`` anyway."""
    if offsets:
        try:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):
            return _own_ids(tok, text)[0], None
        offs = list(enc.get("offset_mapping") or []) or None
    else:
        enc, offs = tok(text, add_special_tokens=False), None
    ids = list(enc["input_ids"])
    if offs is not None and len(offs) != len(ids):
        offs = None
    bos, eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    lo, hi = 0, len(ids)
    # A BOS/EOS id is stray unless the text itself spells that token out.
    while lo < hi and bos is not None and ids[lo] == bos and not text.startswith(_tok_str(tok, bos)):
        lo += 1
    while hi > lo and eos is not None and ids[hi - 1] == eos and not text.endswith(_tok_str(tok, eos)):
        hi -= 1
    return ids[lo:hi], (offs[lo:hi] if offs is not None else None)


def encode_target(tok, text: str) -> list[int]:
    """Ids of a continuation: no special tokens, even from tokenizers that add them anyway."""
    ids, _ = _own_ids(tok, text)
    if not ids:
        raise ValueError(f"target {text!r} tokenizes to no ids")
    return ids


def _tok_str(tok, token_id: int) -> str:
    s = tok.convert_ids_to_tokens(int(token_id)) if hasattr(tok, "convert_ids_to_tokens") else None
    return s if isinstance(s, str) and s else "\0never\0"


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's ids (leading special tokens kept) and the index of the subject's last token."""

    ids: list[int]
    subject_last: int


def encode_prompt(tok, text: str, subject_end: int | None = None) -> EncodedPrompt:
    """Ids of ``text`` as a prompt and, with ``subject_end`` (a character offset into ``text``,
    exclusive), the index in those ids of the token holding character ``subject_end - 1``."""
    plain, offsets = _own_ids(tok, text, offsets=subject_end is not None)
    full = list(tok(text, add_special_tokens=True)["input_ids"])
    lead = _leading_specials(full, plain, tok)
    ids = full[:lead] + plain
    if subject_end is None:
        return EncodedPrompt(ids, -1)
    if not 0 < subject_end <= len(text):
        raise ValueError(f"subject end {subject_end} outside the prompt {text!r} (length {len(text)})")
    idx = _token_at_char_offsets(offsets, subject_end)
    if idx is None:
        idx = _token_at_char_decode(tok, plain, text, subject_end)
    return EncodedPrompt(ids, lead + idx)


def _leading_specials(full: list[int], plain: list[int], tok) -> int:
    """How many ids the tokenizer put before the text's own ids (BOS, usually 0 or 1)."""
    n = len(plain)
    for start in range(len(full) - n + 1):
        if full[start:start + n] == plain:
            return start
    # The tokenizer's special-token call changed the text's own ids (rare); count the special
    # ids at the front instead.
    special = _special_ids(tok)
    start = 0
    while start < len(full) and full[start] in special:
        start += 1
    return start


def _token_at_char_offsets(offsets: list | None, char_end: int) -> int | None:
    """Index (among the text's own ids) of the last token starting before ``char_end``."""
    if not offsets:
        return None
    best = None
    for i, (start, end) in enumerate(offsets):
        if start < char_end and end > start:
            best = i
    return best


def _token_at_char_decode(tok, ids: list[int], text: str, char_end: int) -> int:
    """Fallback without offsets: the first prefix of ids whose decoding covers ``char_end``.

    Decoding may normalise whitespace, so lengths are compared on the text with whitespace
    removed.
    """
    target = len("".join(text[:char_end].split()))
    for i in range(len(ids)):
        decoded = tok.decode(ids[: i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if len("".join(decoded.split())) >= target:
            return i
    return len(ids) - 1


def fill_template(template: str, text: str) -> tuple[str, int]:
    """``template.format(text)`` and the character offset where ``text`` starts in the result.

    Templates are format strings with one ``{}`` (other braces doubled), as context_templates
    writes them.
    """
    out, offset, fields = [], None, 0
    for literal, field, spec, conv in Formatter().parse(template):
        out.append(literal)
        if field is not None:
            if field != "" or spec or conv:
                raise ValueError(f"context template {template!r}: only a bare '{{}}' field is allowed, got {{{field}}}")
            fields += 1
            offset = sum(len(s) for s in out)
            out.append(text)
    if fields != 1:
        raise ValueError(f"context template {template!r} must contain exactly one '{{}}' (found {fields})")
    return "".join(out), offset


@dataclass(frozen=True)
class EncodedEdit:
    """One rewriting sequence: prompt ids + target ids[:-1], with the positions that matter."""

    ids: list[int]  # the model's input
    subject_last: int  # where δ is added / the key is read
    target_ids: list[int]  # the ids scored (all of target_new)
    first_scored: int  # logits at positions first_scored .. first_scored+len(target)-1 predict target_ids


def _subject_end(request: EditRequest, prompt: str) -> int:
    # Trailing whitespace in a subject would point at the next word's token (" is").
    start = request.subject_span[0]
    return min(start + len(request.subject.rstrip()), len(prompt))


def encode_rewrite(tok, request: EditRequest, template: str | None) -> EncodedEdit:
    """The sequence that scores ``target_new`` after ``template`` filled with the request's prompt."""
    prompt, cont = split_target(request.filled_prompt, request.target_new)
    s1 = _subject_end(request, prompt)
    if template is not None:
        prompt, off = fill_template(template, prompt)
        s1 += off
    p = encode_prompt(tok, prompt, s1)
    target = encode_target(tok, cont)
    return EncodedEdit(p.ids + target[:-1], p.subject_last, target, len(p.ids) - 1)


def encode_subject_prompt(tok, request: EditRequest, template: str | None) -> EncodedPrompt:
    """The prompt alone (no target), for keys: ids and the subject's last token."""
    prompt = request.filled_prompt.rstrip()
    s1 = _subject_end(request, prompt)
    if template is not None:
        prompt, off = fill_template(template, prompt)
        s1 += off
    return encode_prompt(tok, prompt, s1)


def encode_kl_prompt(tok, subject: str, kl_template: str = "{} is a") -> EncodedPrompt:
    """``"{subject} is a"``: its ids and the subject's last token (the next-token distribution
    after it is what the KL term keeps)."""
    text, off = fill_template(kl_template, subject.strip())
    return encode_prompt(tok, text, off + len(subject.strip()))
