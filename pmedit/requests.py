"""Edit requests: one validated, immutable form for every input layout.

An edit says "in contexts like ``prompt`` about ``subject``, the model should continue with
``target_new``". Requests arrive as :class:`EditRequest` objects, MEMIT-style dicts
(``{"prompt", "subject", "target_new": {"str": ...}}``), original CounterFact records
(``{"case_id", "requested_rewrite": {...}}``) or the reduced "EasyEdit" CounterFact layout
(``{"case_id", "prompt" (subject filled in), "subject", "target_new", "ground_truth"}``).
:func:`normalize_requests` turns all of them into :class:`EditRequest` and checks each one, so
that a bad request fails before any model work, with an error naming the request (index and
case_id) and the field, instead of as a shape mismatch deep inside value optimisation.

The prompt is stored as a template with exactly one ``{}`` where the subject goes; every
other character is literal (``"{}"`` is located by search, never by ``str.format``, so braces
elsewhere in a prompt or in a subject are harmless). A prompt given with the subject already
filled in becomes a template by replacing the subject's first occurrence; when the subject
itself contains ``{}``, a prompt that contains the subject is always read as filled in.

Rules checked here, before any model work: text must be valid Unicode (no lone surrogates,
which JSON allows and tokenizers reject), a subject is at most :data:`MAX_SUBJECT_CHARS`
characters and a filled prompt at most :data:`MAX_PROMPT_CHARS`, and one call may not ask for
two different targets for the same prompt and subject (neither could land: both edits share
one key). Exact repeats are allowed. :func:`drop_conflicts` keeps the first request of each
prompt and subject (and drops the conflicting ones), for data sets that hold conflicting
rewrites (CounterFact does).

Not here: tokenization (:mod:`pmedit.tokens`) and the loading of data files
(:mod:`pmedit.data`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PLACEHOLDER = "{}"
# Entity names in CounterFact/zsRE are under 100 characters. The bounds only stop inputs that
# would run for minutes per optimisation step (a 3,000-word "subject") without any warning.
MAX_SUBJECT_CHARS = 1000
MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` (a template with one ``{}``) about ``subject`` → ``target_new``.

    ``target_true`` (the model's current answer, when known) is used only by evaluation and by
    the check that an edit changes something. ``prompt`` may also be given filled in (the subject
    appearing in it); it is stored as a template either way. Construction validates; errors name
    the request by its case_id (``normalize_requests`` adds the index in a list).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: Any = None

    def __post_init__(self) -> None:
        template = _validate(
            self.prompt, self.subject, self.target_new, self.target_true, self.case_id, where=_where(None, self.case_id)
        )
        if template != self.prompt:
            object.__setattr__(self, "prompt", template)

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject in place of ``{}``."""
        head, tail = self.prompt.split(PLACEHOLDER, 1)
        return head + self.subject + tail

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the subject in :attr:`filled_prompt`."""
        start = self.prompt.index(PLACEHOLDER)
        return start, start + len(self.subject)

    def to_dict(self) -> dict:
        """The MEMIT-style dict (JSON-ready) that :func:`normalize_requests` reads back."""
        d: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject, "target_new": {"str": self.target_new}}
        if self.target_true is not None:
            d["target_true"] = {"str": self.target_true}
        if self.case_id is not None:
            d["case_id"] = self.case_id
        return d


def _where(index: int | None, case_id: Any) -> str:
    if index is None:
        return f"request (case_id={case_id!r})" if case_id is not None else "request"
    return f"request {index} (case_id={case_id!r})"


def _validate(prompt, subject, target_new, target_true, case_id, *, where: str) -> str:
    """Check one request's fields and return its prompt as a template (with one ``{}``)."""
    for name, value in (("prompt", prompt), ("subject", subject), ("target_new", target_new)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r}: expected a string, got {type(value).__name__} {value!r}")
    if target_true is not None and not isinstance(target_true, str):
        raise ValueError(
            f"{where}: field 'target_true': expected a string or None, got {type(target_true).__name__} {target_true!r}"
        )
    for name, value in (("prompt", prompt), ("subject", subject), ("target_new", target_new),
                        ("target_true", target_true)):
        if value is not None:
            _check_unicode(value, name, where)
    if len(subject) > MAX_SUBJECT_CHARS:
        raise ValueError(f"{where}: field 'subject': {len(subject)} characters ({subject[:40]!r}...); "
                         f"subjects are entity names, at most {MAX_SUBJECT_CHARS} characters")
    if not subject.strip():
        raise ValueError(f"{where}: field 'subject': empty subject")
    if not target_new.strip():
        raise ValueError(f"{where}: field 'target_new': empty target")
    if target_true is not None and not target_true.strip():
        raise ValueError(f"{where}: field 'target_true': empty target (use None when it is unknown)")
    if target_true is not None and target_new.strip() == target_true.strip():
        raise ValueError(
            f"{where}: field 'target_new': {target_new!r} equals target_true; the edit would change nothing"
        )
    if PLACEHOLDER in subject and subject in prompt:
        # The subject's own "{}" is not the slot: the prompt is filled in. (Had it been a
        # template, the subject could not occur in it.)
        prompt = prompt.replace(subject, PLACEHOLDER, 1)
        if prompt.count(PLACEHOLDER) != 1:
            raise ValueError(f"{where}: field 'prompt': has '{{}}' besides the subject {subject!r}; "
                             "with a subject containing '{}' the prompt must be filled in and have no other '{}'")
    n = prompt.count(PLACEHOLDER)
    if n > 1:
        raise ValueError(f"{where}: field 'prompt': {prompt!r} has {n} '{{}}' placeholders; exactly one is allowed")
    if n == 0:
        if subject not in prompt:
            raise ValueError(
                f"{where}: field 'prompt': {prompt!r} has no '{{}}' placeholder and does not contain "
                f"the subject {subject!r}"
            )
        prompt = prompt.replace(subject, PLACEHOLDER, 1)
    head, tail = prompt.split(PLACEHOLDER, 1)
    if not (head + tail).strip():
        raise ValueError(f"{where}: field 'prompt': {prompt!r} has no text besides the subject")
    if len(head) + len(subject) + len(tail) > MAX_PROMPT_CHARS:
        raise ValueError(f"{where}: field 'prompt': {len(head) + len(subject) + len(tail)} characters with the "
                         f"subject filled in; at most {MAX_PROMPT_CHARS}")
    return prompt


def _check_unicode(value: str, name: str, where: str) -> None:
    """Lone surrogates (``"\\ud800"`` in JSON) are valid Python strings but not Unicode text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where}: field {name!r}: not valid Unicode text (character {e.start}: {value[e.start]!r}, "
            f"a lone surrogate) in {value[max(0, e.start - 20):e.start + 20]!r}"
        ) from None


def _str_field(value: Any) -> Any:
    """MEMIT/CounterFact wrap targets as ``{"str": ..., "id": ...}``; unwrap them."""
    if isinstance(value, Mapping):
        return value.get("str", value)
    return value


def _from_mapping(item: Mapping, where: str) -> dict:
    if "requested_rewrite" in item:  # original CounterFact layout
        rw = item["requested_rewrite"]
        if not isinstance(rw, Mapping):
            raise ValueError(f"{where}: field 'requested_rewrite': expected a dict, got {type(rw).__name__}")
        src, case_id = rw, item.get("case_id", rw.get("case_id"))
    else:
        src, case_id = item, item.get("case_id")
    missing = [k for k in ("prompt", "subject", "target_new") if k not in src]
    if missing:
        raise ValueError(f"{where}: field {missing[0]!r}: missing (keys present: {sorted(src)})")
    target_true = src.get("target_true", src.get("ground_truth"))
    if isinstance(target_true, list):  # some zsRE-like layouts keep a list of answers
        target_true = target_true[0] if target_true else None
    return {
        "prompt": src["prompt"],
        "subject": src["subject"],
        "target_new": _str_field(src["target_new"]),
        "target_true": _str_field(target_true),
        "case_id": case_id,
    }


def _record_fields(item: Any) -> Mapping | None:
    """A loader's record (:class:`pmedit.data.CounterFactRecord`, :class:`pmedit.data.ZsreRecord`,
    anything with ``as_memit_dict()``) as its MEMIT dict; None for other objects."""
    as_dict = getattr(type(item), "as_memit_dict", None)
    if not callable(as_dict):
        return None
    d = item.as_memit_dict()
    return d if isinstance(d, Mapping) else None


def normalize_requests(items: Iterable[Any] | EditRequest | Mapping) -> list[EditRequest]:
    """Turn every accepted layout into validated :class:`EditRequest` objects, in order.

    Accepted: :class:`EditRequest`, MEMIT/CounterFact dicts (both layouts), and the records
    :mod:`pmedit.data` loads (``CounterFactRecord``, ``ZsreRecord``). A single request is
    accepted as a list of one. Raises one ``ValueError`` naming the first bad request by index
    and case_id and the offending field; two requests for the same prompt and subject with
    different targets are an error naming both (:func:`drop_conflicts` keeps the first instead).
    """
    return _conflicts(_normalize(items), error=True)[0]


def _normalize(items: Iterable[Any] | EditRequest | Mapping) -> list[EditRequest]:
    if isinstance(items, (EditRequest, Mapping)) or _record_fields(items) is not None:
        items = [items]
    if isinstance(items, (str, bytes)):
        raise ValueError("requests: expected a list of requests, got a string")
    out: list[EditRequest] = []
    for i, item in enumerate(items):
        if isinstance(item, EditRequest):
            # Already validated at construction; re-check anyway so the index is in any error
            # (a subclass or object.__setattr__ could have changed it).
            fields = {
                "prompt": item.prompt, "subject": item.subject, "target_new": item.target_new,
                "target_true": item.target_true, "case_id": item.case_id,
            }
        elif isinstance(item, Mapping):
            fields = _from_mapping(item, _where(i, item.get("case_id")))
        elif (record := _record_fields(item)) is not None:
            fields = _from_mapping(record, _where(i, record.get("case_id")))
        else:
            raise ValueError(
                f"request {i}: expected an EditRequest, a dict or a pmedit.data record, "
                f"got {type(item).__name__} {item!r:.80}"
            )
        where = _where(i, fields["case_id"])
        fields["prompt"] = _validate(**fields, where=where)
        out.append(EditRequest(**fields))
    return out


def drop_conflicts(items: Iterable[Any]) -> tuple[list[EditRequest], list[int]]:
    """``(requests, dropped_indices)``: the requests in order, without those that ask another
    target than an earlier request for the same prompt and subject.

    For data sets with conflicting rewrites (CounterFact: 62 prompts with two targets among the
    10,000 records of easyedit_counterfact-edit.json); MEMIT's "multi-counterfact" drops them too.
    """
    return _conflicts(_normalize(items), error=False)


def _conflicts(reqs: list[EditRequest], *, error: bool) -> tuple[list[EditRequest], list[int]]:
    first: dict[tuple[str, str], int] = {}
    kept: list[EditRequest] = []
    dropped: list[int] = []
    for i, r in enumerate(reqs):
        j = first.setdefault((r.prompt, r.subject), i)
        if j == i:
            kept.append(r)
        elif reqs[j].target_new.strip() == r.target_new.strip():
            kept.append(r)  # an exact repeat: the same constraint twice
        elif error:
            raise ValueError(
                f"{_where(i, r.case_id)}: field 'target_new': {r.target_new!r} conflicts with "
                f"{_where(j, reqs[j].case_id)}, which asks {reqs[j].target_new!r} for the same prompt and subject "
                f"{r.filled_prompt!r}; both edits share one key, so neither would land (keep one; "
                "pmedit.requests.drop_conflicts keeps the first)"
            )
        else:
            dropped.append(i)
    return kept, dropped
