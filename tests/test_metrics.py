"""pmedit.evaluation.metrics: ES/PS/NS/S and magnitudes from hand-fed NLLs, GE from hand-computed entropies."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import hmean

from pmedit.evaluation.metrics import (
    PromptScores,
    RecordScores,
    generation_entropy,
    harmonic_mean,
    ngram_entropy,
    record_scores,
    summarize,
    text_entropy,
    word_tokenize,
)


def test_record_scores_known_answers():
    r = record_scores(
        PromptScores([1.0], [2.0], [True]),  # new more likely: success
        PromptScores([1.0, 3.0], [2.0, 2.0], [True, False]),  # one of two
        PromptScores([5.0, 0.5, 2.0], [1.0, 1.0, 2.0], [True, False, False]),  # true preferred in 1 of 3 (tie fails)
        case_id=4,
    )
    assert r.case_id == 4
    assert r.success == {"rewrite": 1.0, "paraphrase": 0.5, "neighborhood": pytest.approx(1 / 3)}
    e = math.exp
    assert r.magnitude["rewrite"] == pytest.approx(e(-1) - e(-2))
    assert r.magnitude["paraphrase"] == pytest.approx(((e(-1) - e(-2)) + (e(-3) - e(-2))) / 2)
    # NS magnitude is P(true) - P(new)
    assert r.magnitude["neighborhood"] == pytest.approx(((e(-1) - e(-5)) + (e(-1) - e(-0.5)) + 0.0) / 3)
    assert r.accuracy == {"rewrite": 1.0, "paraphrase": 0.5, "neighborhood": pytest.approx(1 / 3)}


def test_ties_fail_both_ways():
    """MEMIT compares strictly: equal NLLs are neither an efficacy nor a specificity success."""
    r = record_scores(PromptScores([1.0], [1.0]), None, PromptScores([1.0], [1.0]))
    assert r.success["rewrite"] == 0.0 and r.success["neighborhood"] == 0.0
    assert r.success["paraphrase"] is None and r.accuracy["rewrite"] is None


def test_summarize_averages_per_record_then_scales():
    a = record_scores(PromptScores([1.0], [2.0]), PromptScores([1.0, 3.0], [2.0, 2.0]), PromptScores([3.0] * 4, [1.0] * 4))
    b = record_scores(PromptScores([2.0], [1.0]), PromptScores([1.0, 1.0], [2.0, 2.0]), PromptScores([0.0] * 4, [1.0] * 4))
    s = summarize([a, b])
    assert s["n_records"] == 2
    assert s["es"] == pytest.approx(50.0) and s["ps"] == pytest.approx(75.0) and s["ns"] == pytest.approx(50.0)
    assert s["score"] == pytest.approx(hmean([50.0, 75.0, 50.0]))
    mag_a = math.exp(-1) - math.exp(-2)
    assert s["es_mag"] == pytest.approx(100 * (mag_a - mag_a) / 2)
    assert s["gen_acc"] is None and s["ge"] is None and s["es_acc"] is None


def test_summarize_without_a_kind_has_no_score():
    r = record_scores(PromptScores([1.0], [2.0]), None, None)
    s = summarize([r])
    assert s["es"] == 100.0 and s["ps"] is None and s["score"] is None


def test_harmonic_mean():
    assert harmonic_mean([1.0, 2.0, 4.0]) == pytest.approx(hmean([1.0, 2.0, 4.0]))
    assert harmonic_mean([90.0, 0.0, 50.0]) == 0.0
    with pytest.raises(ValueError, match="no values"):
        harmonic_mean([])
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([1.0, -1.0])


def test_prompt_scores_lengths_checked():
    with pytest.raises(ValueError, match="nll_new has 2 entries but nll_true has 1"):
        PromptScores([1.0, 2.0], [1.0])


def test_word_tokenize():
    assert word_tokenize("Paris, the capital of France's north-east.") == [
        "Paris", ",", "the", "capital", "of", "France's", "north-east", "."
    ]


def _h(*counts):
    tot = sum(counts)
    return -sum(c / tot * math.log2(c / tot) for c in counts)


def test_entropy_hand_computed():
    # "a b a b": bigrams (a,b)x2 (b,a)x1; trigrams (a,b,a) (b,a,b)
    toks = "a b a b".split()
    assert ngram_entropy(toks, 2) == pytest.approx(_h(2, 1))
    assert ngram_entropy(toks, 3) == pytest.approx(1.0)
    assert text_entropy("a b a b") == pytest.approx((2 / 3 * _h(2, 1) + 4 / 3 * 1.0) / 2)
    # all n-grams distinct: H_n = log2(count)
    t = "one two three four five six"
    assert text_entropy(t) == pytest.approx((2 / 3 * math.log2(5) + 4 / 3 * math.log2(4)) / 2)
    # a repeated word has no information
    assert text_entropy("the the the the the") == 0.0
    # too short for trigrams: H3 = 0
    assert text_entropy("x y") == pytest.approx((2 / 3 * 0.0 + 0.0) / 2)
    texts = ["a b a b", "one two three four five six", "the the the"]
    assert generation_entropy(texts) == pytest.approx(np.mean([text_entropy(x) for x in texts]))
    with pytest.raises(ValueError, match="no texts"):
        generation_entropy([])


def test_summarize_ge_and_gen_acc():
    a = record_scores(PromptScores([1.0], [2.0]), None, None)
    b = record_scores(PromptScores([1.0], [2.0]), None, None)
    a.entropy, b.entropy = 6.0, 5.0
    a.generation_correct, b.generation_correct = True, False
    s = summarize([a, b])
    assert s["ge"] == pytest.approx(550.0) and s["gen_acc"] == pytest.approx(50.0)


def _rs(i, es, ps, ns):
    k = ("rewrite", "paraphrase", "neighborhood")
    v = dict(zip(k, (es, ps, ns)))
    return RecordScores(case_id=i, success=dict(v), magnitude=dict(v), accuracy=dict(v))


def test_bootstrap_intervals_equal_the_plain_definition():
    """The vectorised bootstrap against a loop that resamples records with the same draws and
    summarizes each resample with summarize() (its S included), then takes percentiles."""
    from pmedit.evaluation.metrics import bootstrap_intervals

    rng = np.random.default_rng(1)
    recs = [_rs(i, float(rng.random() > 0.3), float(rng.random()), None if i % 7 == 0 else float(rng.random()))
            for i in range(23)]
    got = bootstrap_intervals(recs, n_boot=200, level=0.9, seed=5)
    idx = np.random.default_rng(5).integers(0, len(recs), size=(200, len(recs)))
    sums = [summarize([recs[j] for j in row]) for row in idx]
    for key in ("es", "ps", "ns", "score"):
        lo, hi = np.quantile([s[key] for s in sums], [0.05, 0.95])
        assert got[f"{key}_lo"] == pytest.approx(lo, abs=1e-9) and got[f"{key}_hi"] == pytest.approx(hi, abs=1e-9)
        assert got[f"{key}_lo"] <= summarize(recs)[key] <= got[f"{key}_hi"]
    assert bootstrap_intervals(recs, n_boot=200, level=0.9, seed=5) == got  # deterministic


def test_bootstrap_intervals_edge_cases():
    from pmedit.evaluation.metrics import bootstrap_intervals

    same = [_rs(i, 1.0, 0.5, 0.25) for i in range(5)]
    got = bootstrap_intervals(same)
    assert got["es_lo"] == got["es_hi"] == 100.0 and got["ps_lo"] == got["ps_hi"] == 50.0
    assert got["score_lo"] == pytest.approx(hmean([100.0, 50.0, 25.0]))
    no_ns = bootstrap_intervals([_rs(i, 1.0, 0.5, None) for i in range(4)])
    assert no_ns["ns_lo"] is None and no_ns["score_lo"] is None and no_ns["es_lo"] == 100.0
    assert all(v is None for v in bootstrap_intervals([]).values())
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_intervals(same, n_boot=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(same, level=1.0)
