"""General-ability probes (the "downstream" evaluation of the batch-editing papers): GLUE-style
classification and multiple choice, scored by comparing log-likelihoods, no sampling.

Each task is a :class:`Task`: the file under ``<shared data>/downstream/``, the fields a record
must have, a zero-shot prompt, the continuations to compare (label words or choice letters,
each with its leading space) and the gold index. The prediction is the continuation with the
highest *summed* log-likelihood after the prompt (a label of several tokens pays for each;
ties go to the first), scored in one packed pass per prompt with all its continuations
(pmedit.evaluation.scoring). ``shots`` > 0 prefixes the first records of the file as worked
examples and scores the rest. Binary tasks report accuracy, F1 of their positive class and
Matthews' correlation; four-way tasks accuracy. A new task is one :func:`register_task` call.

Not here: edit metrics (counterfact, zsre, exact_match).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pmedit.evaluation.hooks import edits_scope
from pmedit.evaluation.metrics import classification_scores
from pmedit.evaluation.scoring import PairEncoder, score_pairs
from pmedit.fileio import read_json_records

__all__ = ["Task", "Example", "TASKS", "register_task", "load_task", "score_task", "TaskResult"]


@dataclass(frozen=True)
class Task:
    name: str
    file: str
    fields: dict  # field -> type (or tuple of types) every record must have
    prompt: Callable[[dict], str]
    choices: Callable[[dict], list[str]]
    label: Callable[[dict], int]  # gold index into choices; ValueError for a bad value
    positive: int | None = None  # binary tasks: the class F1 is about
    primary: str = "acc"  # the figure a table should show first


@dataclass(frozen=True)
class Example:
    index: int  # record index in the file
    prompt: str
    choices: tuple[str, ...]
    label: int


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"downstream task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def _index(values: Sequence, value, what: str) -> int:
    if isinstance(value, bool) or value not in values:
        raise ValueError(f"{what} must be one of {list(values)}, got {value!r}")
    return list(values).index(value)


def _letters(opts: Sequence[str]) -> str:
    return "".join(f"\n{'ABCD'[i]}. {o}" for i, o in enumerate(opts))


_YES_NO = [" no", " yes"]
_TRUE_FALSE = [" True", " False"]
_LETTERS = [" A", " B", " C", " D"]
_SENTIMENT = [" negative", " positive"]

register_task(Task("sst2", "sst2.jsonl", {"sentence": str, "label": int},
                   lambda r: f"Review: {r['sentence'].strip()}\nSentiment:", lambda r: _SENTIMENT,
                   lambda r: _index([0, 1], r["label"], "label"), positive=1))
register_task(Task("sentiment", "sentiment_analysis.jsonl", {"sentence": str, "label": str},
                   lambda r: f"Review: {r['sentence'].strip()}\nSentiment:", lambda r: _SENTIMENT,
                   lambda r: _index(["0", "1"], r["label"], "label"), positive=1))
register_task(Task("mrpc", "mrpc.jsonl", {"sentence1": str, "sentence2": str, "label": int},
                   lambda r: (f"Sentence 1: {r['sentence1'].strip()}\nSentence 2: {r['sentence2'].strip()}\n"
                              "Question: Do both sentences mean the same thing?\nAnswer:"),
                   lambda r: _YES_NO, lambda r: _index([0, 1], r["label"], "label"), positive=1, primary="f1"))
register_task(Task("cola", "cola.jsonl", {"sentence": str, "label": int},
                   lambda r: f"{r['sentence'].strip()}\nQuestion: Does this sentence make sense?\nAnswer:",
                   lambda r: _YES_NO, lambda r: _index([0, 1], r["label"], "label"), positive=1, primary="mcc"))
register_task(Task("rte", "rte.jsonl", {"sentence1": str, "sentence2": str, "label": int},
                   lambda r: f"{r['sentence1'].strip()}\nQuestion: {r['sentence2'].strip()} True or False?\nAnswer:",
                   lambda r: _TRUE_FALSE, lambda r: _index([0, 1], r["label"], "label"), positive=0))
register_task(Task("nli", "nli.jsonl", {"sentence1": str, "sentence2": str, "label": str},
                   lambda r: f"{r['sentence1'].strip()}\nQuestion: {r['sentence2'].strip()} True or False?\nAnswer:",
                   lambda r: _TRUE_FALSE, lambda r: _index(["entailment", "not_entailment"], r["label"], "label"),
                   positive=0))
register_task(Task("mmlu", "mmlu.jsonl", {"question": str, "subject": str, "choices": list, "answer": int},
                   lambda r: (f"The following are multiple choice questions (with answers) about "
                              f"{r['subject'].replace('_', ' ')}.\n\n{r['question'].strip()}{_letters(r['choices'])}"
                              "\nAnswer:"),
                   lambda r: _LETTERS, lambda r: _index([0, 1, 2, 3], r["answer"], "answer")))
register_task(Task("dialogue", "dialogue.jsonl", {"article": str, "options": list, "answers": str},
                   lambda r: (f"{r['article'].strip()}\nWhich reply is the most likely next turn?"
                              f"{_letters(r['options'])}\nAnswer:"),
                   lambda r: _LETTERS, lambda r: _index(list("ABCD"), r["answers"], "answers")))


def _check(path: Path, i: int, rec, task: Task) -> None:
    where = f"{path}: record {i}"
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for f, typ in task.fields.items():
        if f not in rec:
            raise ValueError(f"{where}: field {f!r}: missing")
        v = rec[f]
        if isinstance(v, bool) or not isinstance(v, typ):
            raise ValueError(f"{where}: field {f!r}: expected {typ.__name__}, got {type(v).__name__}")
        if typ is str and not v.strip():
            raise ValueError(f"{where}: field {f!r}: empty string")
        if typ is list:
            if len(v) != 4 or not all(isinstance(o, str) and o.strip() for o in v):
                raise ValueError(f"{where}: field {f!r}: expected 4 non-empty strings, got {v!r:.80}")


def load_task(task: str | Task, data_dir: str | Path | None = None, *, path: str | Path | None = None,
              limit: int | None = None) -> list[Example]:
    """The task's examples, every record validated (errors name file, record and field); the
    first ``limit`` after validating the whole file."""
    t = TASKS[task] if isinstance(task, str) and task in TASKS else task
    if not isinstance(t, Task):
        raise ValueError(f"unknown downstream task {task!r}; known: {sorted(TASKS)}")
    if path is None:
        if data_dir is None:
            from pmedit.evaluation.registry import shared_data_dir

            data_dir = shared_data_dir()
        path = Path(data_dir) / "downstream" / t.file
    p = Path(path)
    out = []
    for i, rec in enumerate(read_json_records(p)):
        _check(p, i, rec, t)
        try:
            label = t.label(rec)
        except ValueError as e:
            fld = next((f for f in ("label", "answer", "answers") if f in rec), "label")
            raise ValueError(f"{p}: record {i}: field {fld!r}: {e}") from None
        out.append(Example(i, t.prompt(rec), tuple(t.choices(rec)), label))
    if not out:
        raise ValueError(f"{p}: no records")
    return out[:limit] if limit is not None else out


@dataclass
class TaskResult:
    task: str
    pred: list[int]
    gold: list[int]
    logprobs: list[list[float]]  # per example, the summed log-likelihood of each choice
    summary: dict

    def to_dict(self) -> dict:
        return {"task": self.task, "summary": self.summary, "pred": self.pred, "gold": self.gold}


@torch.no_grad()
def score_task(
    model: nn.Module,
    tok,
    task: str | Task,
    examples: Sequence[Example],
    *,
    shots: int = 0,
    batch_size: int | None = None,
    edits=None,
    group: int = 0,
    progress: bool = False,
) -> TaskResult:
    """Predictions and scores of ``examples``; the first ``shots`` of them become the worked
    examples of every prompt and are not scored. ``edits``: score every example under group
    ``group`` of these per-group updates."""
    t = TASKS[task] if isinstance(task, str) else task
    if shots < 0 or shots >= len(examples):
        raise ValueError(f"{t.name}: shots must be in 0..{len(examples) - 1}, got {shots}")
    prefix = "".join(f"{e.prompt}{e.choices[e.label]}\n\n" for e in examples[:shots])
    scored = list(examples[shots:])
    enc = PairEncoder(tok)
    pairs, owner = [], []
    for j, e in enumerate(scored):
        for c in e.choices:
            pairs.append(enc(prefix + e.prompt, c))
            owner.append(j)
    with edits_scope(edits):
        s = score_pairs(model, tok, pairs, edits=edits, row_edits=[group] * len(pairs) if edits is not None else None,
                        batch_size=batch_size, progress=progress)
    lp: list[list[float]] = [[] for _ in scored]
    for k, j in enumerate(owner):
        lp[j].append(-float(s.nll_sum[k]))
    pred = [max(range(len(v)), key=lambda c, v=v: (v[c], -c)) for v in lp]  # first of equal maxima
    gold = [e.label for e in scored]
    summary = classification_scores(pred, gold, positive=t.positive)
    summary["shots"] = shots
    return TaskResult(t.name, pred, gold, lp, summary)
