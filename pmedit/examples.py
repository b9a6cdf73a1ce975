"""A handful of counterfactual edits written for this project, for demos and smoke tests.

Each fact is one that the default model (SmolLM2-135M-Instruct) completes correctly with
greedy decoding before any edit (checked by tests/test_editor.py), so the before/after
completions of ``pmedit edit`` show a real change. The new targets are deliberately false and
distinct from each other, so that one edit cannot pass by leaking another's answer.

Not a benchmark: use CounterFact (pmedit.data) for measurements.
"""
from __future__ import annotations

from pmedit.requests import EditRequest

EXAMPLES: tuple[EditRequest, ...] = (
    EditRequest(prompt="The capital of {} is", subject="France", target_new="London",
                target_true="Paris", case_id="capital-france"),
    EditRequest(prompt="The capital of {} is", subject="Japan", target_new="Cairo",
                target_true="Tokyo", case_id="capital-japan"),
    EditRequest(prompt="The capital of {} is", subject="Germany", target_new="Vienna",
                target_true="Berlin", case_id="capital-germany"),
    EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome",
                target_true="Paris", case_id="eiffel-city"),
    EditRequest(prompt="{} is a company from", subject="Toyota", target_new="Sweden",
                target_true="Japan", case_id="toyota-country"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                target_true="French", case_id="darrieux-language"),
)


def example_requests(n: int | None = None) -> list[EditRequest]:
    """The first ``n`` examples (all by default), as a new list."""
    if n is not None and not 0 < n <= len(EXAMPLES):
        raise ValueError(f"n must be between 1 and {len(EXAMPLES)}, got {n}")
    return list(EXAMPLES[:n])
