"""``python -m pmedit.bench``: throughput benchmarks, one section per module in this package.

A section is a module here defining ``ORDER`` (int, for listing order), ``HELP`` (one line)
and ``run(quick: bool) -> list[pmedit.bench.harness.Row]``. Sections are discovered, not
registered, so adding one touches no other file.
"""
from __future__ import annotations

import importlib
import pkgutil

_NOT_SECTIONS = {"harness", "__main__"}


def sections() -> dict[str, object]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_SECTIONS or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if callable(getattr(mod, "run", None)):
            found[info.name] = mod
    return dict(sorted(found.items(), key=lambda kv: (getattr(kv[1], "ORDER", 100), kv[0])))
