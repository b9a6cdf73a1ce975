"""Evaluation data sets: CounterFact (both layouts) and zsRE (MEND layout) as typed records.

CounterFact ships in two layouts (see ../shared/data/README.md): the original ROME/MEMIT one
(a ``requested_rewrite`` with a ``{}`` prompt template and lists of 2 paraphrase, 10
neighbourhood, 10 attribute and 10 generation prompts) and the reduced "EasyEdit" one (the
subject already filled into the prompt, one paraphrase and one neighbourhood prompt). Both are
read into one :class:`CounterFactRecord` so the metrics never care which layout a file used;
lists a layout lacks are empty. Every record is validated on load, because a bad record found
halfway through a two-hour experiment is far more expensive than one found at start-up; the
error names the file, the record index, the case_id and the field.

This module only reads and validates; it does not tokenize, sample or cache.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmedit.fileio import read_json_records  # noqa: F401 - re-exported: the loaders' reader

__all__ = ["CounterFactRecord", "ZsreRecord", "load_counterfact", "load_zsre", "fill"]

SUBJECT_SLOT = "{}"


def fill(template: str, subject: str) -> str:
    """The prompt with its subject; plain replacement, not ``str.format``, because real prompts
    contain other braces."""
    return template.replace(SUBJECT_SLOT, subject, 1)


@dataclass(frozen=True)
class CounterFactRecord:
    """One CounterFact case, whichever layout it came from.

    ``prompt`` is a template with ``{}`` where the subject goes (the MEMIT convention; the
    editor finds the subject's last token from it). ``neighborhood_target`` is the answer the
    neighbourhood prompts should keep: the original layout has no separate field for it (it is
    ``target_true``), the reduced layout stores it as ``locality_ground_truth``.
    """

    case_id: int
    subject: str
    prompt: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    neighborhood_target: str = ""
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    layout: str = "original"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def rewrite_prompt(self) -> str:
        return fill(self.prompt, self.subject)

    def as_memit_dict(self) -> dict:
        """The request in the MEMIT dict form (``requested_rewrite``), which the editor's
        ``normalize_requests`` accepts."""
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": {"str": self.target_new},
            "target_true": {"str": self.target_true},
        }

    def to_request(self):
        """An :class:`pmedit.requests.EditRequest` for this case (imported here so that reading
        data never needs the editing stack)."""
        from pmedit.requests import EditRequest

        return EditRequest(
            prompt=self.prompt,
            subject=self.subject,
            target_new=self.target_new,
            target_true=self.target_true,
            case_id=self.case_id,
        )


@dataclass(frozen=True)
class ZsreRecord:
    """One zsRE question in the MEND layout.

    Following MEMIT's zsRE loader the edit target is ``answers[0]``; ``alt`` (MEND's target)
    and ``pred`` (the original model's answer) are kept for callers that want MEND's protocol.
    ``loc``/``loc_answer`` is the unrelated Natural-Questions pair used for specificity.
    """

    case_id: int
    subject: str
    prompt: str  # template with {}
    target_new: str
    answers: tuple[str, ...]
    alt: str
    pred: str
    paraphrase_prompts: tuple[str, ...]
    loc_prompt: str
    loc_answer: str

    @property
    def rewrite_prompt(self) -> str:
        return fill(self.prompt, self.subject)

    def as_memit_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": {"str": self.target_new},
        }


class _Checker:
    """Field access that turns a bad value into an error naming file, record and field."""

    def __init__(self, path: Path, index: int, rec: Any):
        self.path, self.index, self.rec = path, index, rec
        self.case_id = rec.get("case_id") if isinstance(rec, dict) else None

    def fail(self, fld: str, msg: str) -> ValueError:
        cid = f" (case_id={self.case_id})" if self.case_id is not None else ""
        return ValueError(f"{self.path}: record {self.index}{cid}: field {fld!r}: {msg}")

    def get(self, obj: Any, key: str, typ: type | tuple[type, ...], fld: str | None = None, *, optional=False):
        fld = fld or key
        if not isinstance(obj, dict) or key not in obj:
            if optional:
                return None
            raise self.fail(fld, "missing")
        val = obj[key]
        # bool is an int subclass; a case_id of True is a data error, not the id 1
        if isinstance(val, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
            raise self.fail(fld, f"expected {_tname(typ)}, got bool")
        if not isinstance(val, typ):
            raise self.fail(fld, f"expected {_tname(typ)}, got {type(val).__name__}")
        return val

    def text(self, obj: Any, key: str, fld: str | None = None, *, optional=False, nonempty=True) -> str | None:
        val = self.get(obj, key, str, fld, optional=optional)
        if val is not None and nonempty and not val.strip():
            raise self.fail(fld or key, "empty string")
        return val

    def strings(self, obj: Any, key: str, fld: str | None = None, *, optional=False) -> tuple[str, ...]:
        val = self.get(obj, key, list, fld, optional=optional)
        if val is None:
            return ()
        for j, s in enumerate(val):
            if not isinstance(s, str):
                raise self.fail(f"{fld or key}[{j}]", f"expected str, got {type(s).__name__}")
        return tuple(val)


def _tname(typ) -> str:
    return " or ".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__


def _original_record(c: _Checker, rec: dict) -> CounterFactRecord:
    case_id = c.get(rec, "case_id", int)
    rw = c.get(rec, "requested_rewrite", dict)
    prompt = c.text(rw, "prompt", "requested_rewrite.prompt")
    subject = c.text(rw, "subject", "requested_rewrite.subject")
    tn = c.get(rw, "target_new", dict, "requested_rewrite.target_new")
    tt = c.get(rw, "target_true", dict, "requested_rewrite.target_true")
    target_new = c.text(tn, "str", "requested_rewrite.target_new.str")
    target_true = c.text(tt, "str", "requested_rewrite.target_true.str")
    if SUBJECT_SLOT not in prompt:
        raise c.fail("requested_rewrite.prompt", f"prompt {prompt!r} has no '{{}}' slot for its subject {subject!r}")
    return CounterFactRecord(
        case_id=case_id,
        subject=subject,
        prompt=prompt,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=c.strings(rec, "paraphrase_prompts"),
        neighborhood_prompts=c.strings(rec, "neighborhood_prompts"),
        attribute_prompts=c.strings(rec, "attribute_prompts", optional=True),
        generation_prompts=c.strings(rec, "generation_prompts", optional=True),
        neighborhood_target=target_true,
        relation_id=c.get(rw, "relation_id", str, "requested_rewrite.relation_id", optional=True),
        target_new_id=c.get(tn, "id", str, "requested_rewrite.target_new.id", optional=True),
        target_true_id=c.get(tt, "id", str, "requested_rewrite.target_true.id", optional=True),
        layout="original",
    )


def _reduced_record(c: _Checker, rec: dict) -> CounterFactRecord:
    case_id = c.get(rec, "case_id", int)
    prompt = c.text(rec, "prompt")
    subject = c.text(rec, "subject")
    if subject not in prompt:
        raise c.fail("prompt", f"prompt {prompt!r} does not contain its subject {subject!r}")
    rephrase = c.text(rec, "rephrase_prompt", optional=True)
    loc = c.text(rec, "locality_prompt", optional=True)
    loc_gt = c.text(rec, "locality_ground_truth", optional=True)
    target_true = c.text(rec, "ground_truth")
    if loc is not None and loc_gt is None:
        raise c.fail("locality_ground_truth", "missing (locality_prompt is given)")
    return CounterFactRecord(
        case_id=case_id,
        subject=subject,
        prompt=prompt.replace(subject, SUBJECT_SLOT, 1),
        target_new=c.text(rec, "target_new"),
        target_true=target_true,
        paraphrase_prompts=(rephrase,) if rephrase is not None else (),
        neighborhood_prompts=(loc,) if loc is not None else (),
        neighborhood_target=loc_gt if loc_gt is not None else target_true,
        layout="reduced",
    )


def load_counterfact(path: str | os.PathLike, *, limit: int | None = None) -> list[CounterFactRecord]:
    """Read a CounterFact file in either layout (detected per record) and validate it whole.

    ``limit`` keeps the first records, after validating the whole file (a truncated view of a
    broken file should not look healthy).
    """
    p, data = Path(path), read_json_records(path)
    out: list[CounterFactRecord] = []
    seen: dict[int, int] = {}
    for i, rec in enumerate(data):
        c = _Checker(p, i, rec)
        if not isinstance(rec, dict):
            raise ValueError(f"{p}: record {i}: expected a JSON object, got {type(rec).__name__}")
        r = _original_record(c, rec) if "requested_rewrite" in rec else _reduced_record(c, rec)
        if r.case_id in seen:
            raise c.fail("case_id", f"duplicate case_id {r.case_id} (first at record {seen[r.case_id]})")
        seen[r.case_id] = i
        out.append(r)
    return out[:limit] if limit is not None else out


def load_zsre(path: str | os.PathLike, *, limit: int | None = None) -> list[ZsreRecord]:
    """Read zsRE questions in the MEND layout; ``case_id`` is the record's index in the file
    (the layout has none)."""
    p, data = Path(path), read_json_records(path)
    out: list[ZsreRecord] = []
    for i, rec in enumerate(data):
        c = _Checker(p, i, rec)
        if not isinstance(rec, dict):
            raise ValueError(f"{p}: record {i}: expected a JSON object, got {type(rec).__name__}")
        subject = c.text(rec, "subject")
        src = c.text(rec, "src")
        if subject not in src:
            raise c.fail("src", f"question {src!r} does not contain its subject {subject!r}")
        answers = c.strings(rec, "answers")
        if not answers:
            raise c.fail("answers", "empty list")
        for j, a in enumerate(answers):
            if not a.strip():
                raise c.fail(f"answers[{j}]", "empty string")
        out.append(
            ZsreRecord(
                case_id=i,
                subject=subject,
                prompt=src.replace(subject, SUBJECT_SLOT, 1),
                target_new=answers[0],
                answers=answers,
                alt=c.text(rec, "alt"),
                pred=c.text(rec, "pred", nonempty=False),
                paraphrase_prompts=(c.text(rec, "rephrase"),),
                loc_prompt=c.text(rec, "loc"),
                loc_answer=c.text(rec, "loc_ans"),
            )
        )
    return out[:limit] if limit is not None else out


def select(records: Sequence, n: int | None, *, seed: int | None = None) -> list:
    """The first ``n`` records, or a seeded random sample of ``n`` (stable across runs and
    machines: Python's ``random.Random`` with an explicit seed)."""
    records = list(records)
    if n is None or n >= len(records):
        n = len(records)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed is None:
        return records[:n]
    import random

    idx = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in idx]
