"""CounterFact metrics from per-prompt NLLs, and generation entropy, as MEMIT's evaluation
defines them; pure arithmetic, no model.

The model-side work (one forward pass per prompt+target, batched) is in
:mod:`pmedit.evaluation.counterfact`; keeping the arithmetic separate lets the tests feed NLLs in by hand
and check each definition exactly.

Definitions (MEMIT ``compute_rewrite_quality_counterfact`` + ``summarize.py``), with
``nll_x`` the *mean per-token* negative log-likelihood of `` target_x`` after the prompt:

- ES (efficacy): fraction of rewrite prompts with ``nll_true > nll_new``; PS the same over
  paraphrase prompts; NS (specificity): fraction of neighbourhood prompts with
  ``nll_true < nll_new``. Each is a fraction *per record*, then averaged over records.
- magnitudes: ``exp(-nll_new) - exp(-nll_true)`` (the reverse for NS), per prompt, averaged
  per record then over records.
- S: harmonic mean of the three averaged success rates.
- GE (fluency): per text, the mean of ``2/3·H₂`` and ``4/3·H₃``, H_n the entropy in bits of
  the word n-gram frequency distribution; averaged over texts.

All summary figures are ×100, as MEMIT reports them (GE ≈ 600 for fluent text).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "PromptScores",
    "RecordScores",
    "record_scores",
    "summarize",
    "bootstrap_intervals",
    "harmonic_mean",
    "word_tokenize",
    "ngram_entropy",
    "text_entropy",
    "generation_entropy",
    "normalize_answer",
    "exact_match",
    "classification_scores",
]

KINDS = ("rewrite", "paraphrase", "neighborhood")


@dataclass
class PromptScores:
    """Mean per-token NLLs of the two targets after each prompt of one kind, for one record.

    ``correct`` is MEMIT's teacher-forced accuracy: every token of the *expected* target (new
    for rewrite/paraphrase, true for neighbourhood) is the argmax; None when not measured.
    """

    nll_new: list[float]
    nll_true: list[float]
    correct: list[bool] | None = None

    def __post_init__(self):
        if len(self.nll_new) != len(self.nll_true):
            raise ValueError(f"nll_new has {len(self.nll_new)} entries but nll_true has {len(self.nll_true)}")


@dataclass
class RecordScores:
    """One record's metrics; a kind with no prompts is None (not 0), so it drops out of means."""

    case_id: int | None
    success: dict[str, float | None] = field(default_factory=dict)
    magnitude: dict[str, float | None] = field(default_factory=dict)
    accuracy: dict[str, float | None] = field(default_factory=dict)
    generation_correct: bool | None = None
    entropy: float | None = None  # GE of this record's generated texts (bits, not ×100)

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "success": dict(self.success),
            "magnitude": dict(self.magnitude),
            "accuracy": dict(self.accuracy),
            "generation_correct": self.generation_correct,
            "entropy": self.entropy,
        }


def _kind_scores(kind: str, s: PromptScores | None) -> tuple[float | None, float | None, float | None]:
    if s is None or len(s.nll_new) == 0:
        return None, None, None
    new = np.asarray(s.nll_new, dtype=np.float64)
    true = np.asarray(s.nll_true, dtype=np.float64)
    if kind == "neighborhood":  # the edit must NOT leak: the true answer should stay preferred
        ok = true < new
        mag = np.exp(-true) - np.exp(-new)
    else:
        ok = true > new
        mag = np.exp(-new) - np.exp(-true)
    acc = float(np.mean(s.correct)) if s.correct is not None and len(s.correct) else None
    return float(ok.mean()), float(mag.mean()), acc


def record_scores(
    rewrite: PromptScores | None,
    paraphrase: PromptScores | None,
    neighborhood: PromptScores | None,
    *,
    case_id: int | None = None,
) -> RecordScores:
    r = RecordScores(case_id=case_id)
    for kind, s in zip(KINDS, (rewrite, paraphrase, neighborhood)):
        r.success[kind], r.magnitude[kind], r.accuracy[kind] = _kind_scores(kind, s)
    return r


def harmonic_mean(xs: Sequence[float]) -> float:
    """Harmonic mean (scipy.stats.hmean's value); 0 when any entry is 0, as a score must be
    when one of its parts fails completely."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("harmonic_mean of no values")
    if any(x < 0 for x in xs):
        raise ValueError(f"harmonic_mean needs non-negative values, got {xs}")
    if any(x == 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


_SHORT = {"rewrite": "es", "paraphrase": "ps", "neighborhood": "ns"}


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def summarize(records: Sequence[RecordScores]) -> dict[str, float | None]:
    """Averages over records, ×100: es/ps/ns (success), es_mag/ps_mag/ns_mag, es_acc/...,
    score (S, the harmonic mean of es, ps, ns; None unless all three exist), gen_acc, ge."""
    out: dict[str, float | None] = {"n_records": len(records)}
    for kind, short in _SHORT.items():
        for key, attr in (("", "success"), ("_mag", "magnitude"), ("_acc", "accuracy")):
            m = _mean(getattr(r, attr)[kind] for r in records)
            out[short + key] = None if m is None else 100.0 * m
    parts = [out["es"], out["ps"], out["ns"]]
    out["score"] = harmonic_mean(parts) if all(p is not None for p in parts) else None
    g = _mean(None if r.generation_correct is None else float(r.generation_correct) for r in records)
    out["gen_acc"] = None if g is None else 100.0 * g
    e = _mean(r.entropy for r in records)
    out["ge"] = None if e is None else 100.0 * e
    return out


def bootstrap_intervals(records: Sequence[RecordScores], *, n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0) -> dict[str, float | None]:
    """Percentile-bootstrap intervals over records of es/ps/ns (success) and S: ``es_lo``,
    ``es_hi``, … ×100. Records are the unit of resampling because a record's prompts share its
    edit (they are not independent); S is recomputed from each resample's three means, so its
    interval is S's own, not one derived from the parts'. Deterministic under ``seed``."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"bootstrap_intervals: n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_intervals: level must be in (0, 1), got {level!r}")
    names = [f"{s}_{end}" for s in ("es", "ps", "ns", "score") for end in ("lo", "hi")]
    out: dict[str, float | None] = dict.fromkeys(names)
    if not records:
        return out
    X = np.array([[np.nan if r.success[k] is None else r.success[k] for k in KINDS] for r in records], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(records), size=(n_boot, len(records)))
    S = X[idx]  # [n_boot, n, 3]
    cnt = (~np.isnan(S)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(cnt > 0, np.nansum(S, axis=1) / np.maximum(cnt, 1), np.nan)  # [n_boot, 3]
        hm = np.where((means > 0).all(axis=1), 3.0 / (1.0 / means).sum(axis=1), 0.0)
    hm = np.where(np.isnan(means).any(axis=1), np.nan, hm)
    a = (1.0 - level) / 2.0
    for j, short in enumerate(("es", "ps", "ns", "score")):
        col = hm if short == "score" else means[:, j]
        col = col[~np.isnan(col)]
        if len(col) == n_boot:  # a kind no record has (or a resample without it) has no interval
            out[f"{short}_lo"], out[f"{short}_hi"] = (100.0 * float(q) for q in np.quantile(col, [a, 1.0 - a]))
    return out


def mean_interval(values: Sequence[float], *, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float] | tuple[None, None]:
    """Percentile-bootstrap interval of a plain mean over per-record values (as
    :func:`bootstrap_intervals`, for a metric that is one number per record, e.g. GE)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None, None
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(x[idx].mean(axis=1), [a, 1.0 - a])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------
# generation entropy

# Close to NLTK's word_tokenize (which MEMIT uses) for plain English prose: words with
# internal apostrophes/hyphens/periods kept whole, every other punctuation mark its own token.
# NLTK is not a dependency; the two agree on the n-gram *counts* of ordinary text up to rare
# contractions ("don't" -> do n't), which changes GE by far less than run-to-run sampling.
_WORD = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the n-grams of ``tokens`` (0 when
    there are none)."""
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in grams.values())


def text_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """MEMIT's ``compute_n_gram_entropy``: arithmetic mean of weight·H_n (bits)."""
    if len(ns) != len(weights):
        raise ValueError(f"ns {list(ns)} and weights {list(weights)} differ in length")
    toks = word_tokenize(text)
    return float(np.mean([w * ngram_entropy(toks, n) for n, w in zip(ns, weights)]))


def generation_entropy(texts: Sequence[str]) -> float:
    """Mean :func:`text_entropy` over texts (bits; ×100 is the reported GE)."""
    if not texts:
        raise ValueError("generation_entropy of no texts")
    return float(np.mean([text_entropy(t) for t in texts]))


# ---------------------------------------------------------------------------------------
# exact match (SQuAD / LocFT-BF normalisation) and classification metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, as LocFT-BF compares answers: lower-case, punctuation removed,
    articles (a, an, the) removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, target: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(target)


def classification_scores(pred: Sequence[int], gold: Sequence[int], *, positive: int | None = None) -> dict:
    """accuracy, and for a binary task (``positive`` = the positive class) F1 of that class and
    Matthews' correlation; all ×100, as GLUE reports them. F1 is 0 and MCC 0 when undefined
    (no predicted or no gold positives; a constant prediction), as scikit-learn returns them."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} labels")
    if not gold:
        raise ValueError("classification_scores of no examples")
    p, g = np.asarray(pred), np.asarray(gold)
    out = {"n": len(gold), "acc": 100.0 * float((p == g).mean())}
    if positive is not None:
        pp, gp = p == positive, g == positive
        tp, fp, fn = int((pp & gp).sum()), int((pp & ~gp).sum()), int((~pp & gp).sum())
        tn = len(g) - tp - fp - fn
        out["f1"] = 100.0 * (2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = 100.0 * ((tp * tn - fp * fn) / den if den else 0.0)
    return out
