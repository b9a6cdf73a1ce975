"""The experiments of "Is Bigger Edit Batch Size Always Better?" (Llama-3 study), resumable.

``layer-sweep``, ``batch``, ``sequential-batch`` and ``lambda-sweep`` are each a planned list
of units run through :func:`run_experiment`; results go to a run directory as JSON, CSV and a
PNG. The same code runs reduced (SmolLM2 on a CPU, tens of edits) and full scale (a Llama on a
GPU, thousands); only the config changes.

Not here: editing (:mod:`pmedit.editor`) and metrics (:mod:`pmedit.evaluation`).
"""
from pmedit.experiments.config import EXPERIMENTS, EvalSettings, ExperimentConfig
from pmedit.experiments.runner import plan, report_experiment, run_experiment

__all__ = ["EXPERIMENTS", "EvalSettings", "ExperimentConfig", "plan", "report_experiment", "run_experiment"]
