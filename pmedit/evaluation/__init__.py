"""Evaluation of edited models: one batched scorer shared by every dataset.

- :mod:`.scoring`: teacher-forced scoring of (prompt, target) pairs, packed and batched;
  greedy/sampled generation. Ids come from :mod:`pmedit.tokens`, as for value optimisation.
- :mod:`.hooks`: per-group low-rank updates applied by a forward hook (singular edits, or each
  batch of a large run under its own update) without touching the weights.
- :mod:`.counterfact`, :mod:`.zsre`, :mod:`.exact_match`, :mod:`.downstream`,
  :mod:`.perplexity`: what each dataset or probe scores; :mod:`.metrics` the arithmetic.
- :mod:`.registry`: the datasets and metric sets by name (what experiment configs refer to).

Editing itself is elsewhere (pmedit.editor, pmedit.methods).
"""
from pmedit.evaluation.counterfact import EvalResult, evaluate_counterfact, prompt_entropy
from pmedit.evaluation.downstream import TASKS, Task, load_task, register_task, score_task
from pmedit.evaluation.exact_match import evaluate_exact_match
from pmedit.evaluation.hooks import GroupDeltas, RankOneEdits, low_rank_factors, rank_one_factors
from pmedit.evaluation.metrics import RecordScores, classification_scores, generation_entropy, normalize_answer, summarize
from pmedit.evaluation.perplexity import load_heldout_text, perplexity
from pmedit.evaluation.registry import (
    DATASETS, METRIC_SETS, load_dataset, register_dataset, register_metric_set, run_metric_sets,
)
from pmedit.evaluation.scoring import PairScores, default_score_batch, encode_pair, generate, score_pairs, score_targets
from pmedit.evaluation.zsre import evaluate_zsre

__all__ = [
    "EvalResult", "evaluate_counterfact", "prompt_entropy", "GroupDeltas", "RankOneEdits", "low_rank_factors", "rank_one_factors",
    "RecordScores", "generation_entropy", "summarize", "load_heldout_text", "perplexity", "PairScores",
    "default_score_batch", "encode_pair", "generate", "score_pairs", "score_targets", "TASKS", "Task", "load_task",
    "register_task", "score_task", "evaluate_exact_match", "classification_scores", "normalize_answer", "DATASETS",
    "METRIC_SETS", "load_dataset", "register_dataset", "register_metric_set", "run_metric_sets", "evaluate_zsre",
]
