"""scripts/compare_rows.py: one row per argument or an error naming the run and the filter."""
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("compare_rows", Path(__file__).parents[1] / "scripts" / "compare_rows.py")
compare_rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_rows)


def _run(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"rows": rows}))
    return d


def _row(method, lam, es):
    return {"method": method, "lam": lam, "es": es, "es_lo": es - 1, "es_hi": es + 1, "ps": 50.0, "ns": 60.0,
            "score": 55.0, "ppl": 40.0}


def test_picks_one_row_per_argument_and_writes_the_plot(tmp_path, capsys):
    a = _run(tmp_path, "a", [_row("memit", 10.0, 70.0), _row("memit", 100.0, 80.0)])
    b = _run(tmp_path, "b", [_row("emmet", None, 90.0)])
    out = tmp_path / "cmp.png"
    assert compare_rows.main([str(out), f"{a}:method=memit,lam=100@ridge=100", f"{b}:method=emmet@other"]) == 0
    assert out.stat().st_size > 0 and not list(tmp_path.glob(".*.tmp.png"))
    printed = capsys.readouterr().out
    assert "ridge=100: ES 80.0" in printed and "other: ES 90.0" in printed  # '=' in a label is kept


@pytest.mark.parametrize("spec, msg", [("{a}:method=memit@x", "2 rows match"),
                                       ("{a}:method=rome@x", "0 rows match"),
                                       ("{a}:method@x", "not key=value"),
                                       ("{a}:method=memit", "expected RUN_DIR"),
                                       ("{a}/missing:method=memit@x", "no results")])
def test_a_spec_that_does_not_pick_exactly_one_row_is_an_error(tmp_path, capsys, spec, msg):
    a = _run(tmp_path, "a", [_row("memit", 10.0, 70.0), _row("memit", 100.0, 80.0)])
    out = tmp_path / "cmp.png"
    assert compare_rows.main([str(out), spec.format(a=a)]) == 2
    assert msg in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("text, msg", [("[1, 2]", "no 'rows' list"), ("{\"rows\": ", "invalid JSON")])
def test_a_results_file_that_is_not_a_runs_results_is_an_error(tmp_path, capsys, text, msg):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "results.json").write_text(text)
    assert compare_rows.main([str(tmp_path / "cmp.png"), f"{d}:method=memit@x"]) == 2
    assert msg in capsys.readouterr().err
