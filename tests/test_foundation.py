"""The plumbing every op relies on: backend dispatch, the JIT loader's fallback, the bench harness."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from pmedit.bench.harness import compare, format_table, time_interleaved
from pmkernels._dispatch import select_backend


def _ok(device):
    return None


def _no(device):
    return "missing"


def test_auto_prefers_compiled_cpu_then_torch(monkeypatch):
    monkeypatch.delenv("PMKERNELS_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert select_backend("op", "auto", cpu, {"cpu": _ok}) == "cpu"
    assert select_backend("op", "auto", cpu, {"cpu": _no}) == "torch"
    assert select_backend("op", "auto", cpu, {}) == "torch"


def test_env_override_and_explicit_errors(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("PMKERNELS_BACKEND", "torch")
    assert select_backend("op", "auto", cpu, {"cpu": _ok}) == "torch"
    monkeypatch.setenv("PMKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PMKERNELS_BACKEND"):
        select_backend("op", "auto", cpu, {})
    monkeypatch.delenv("PMKERNELS_BACKEND")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu: missing"):
        select_backend("op", "cuda", cpu, {"cuda": _no})
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("op", "fast", cpu, {})


def test_build_fallback_warns_once(monkeypatch):
    from pmkernels import _build

    monkeypatch.setenv("PMKERNELS_NO_BUILD", "1")
    monkeypatch.setattr(_build, "_CACHE", {})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _build.load_extension("pm_test_ext", ["does_not_matter.cpp"]) is None
        assert _build.load_extension("pm_test_ext", ["does_not_matter.cpp"]) is None
    assert len([w for w in rec if "pm_test_ext" in str(w.message)]) == 1


def test_interleaved_timing_and_ratio():
    calls = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then interleaved rounds
    assert all(len(v) == 3 for v in times.values())
    rows = compare("s", "c", {"ref": lambda: sum(range(20000)), "fast": lambda: None}, reference="ref", work=10, unit="x")
    by = {r.provider: r for r in rows}
    assert by["ref"].ratio == pytest.approx(1.0)
    assert by["fast"].ratio > 1.0
    assert "fast" in format_table(rows)


def test_cli_help_is_cheap():
    out = subprocess.run([sys.executable, "-m", "pmedit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("edit", "stats", "experiment"):
        assert cmd in out.stdout
