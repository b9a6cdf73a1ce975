"""Editing methods as plug-ins: one file per method, one line per method in ``_METHODS``.

Everything that lists methods reads this registry: hyperparameter validation, the CLI's
``--method`` choices, experiment configs, the Editor. Adding a method is a new file defining a
:class:`Method` (its hyperparameter class, algorithm, λ-sweep field, presets) and one line here;
docs/DESIGN.md shows the recipe.
"""
from __future__ import annotations

from pmedit.methods.base import EditContext, EditError, Method

__all__ = ["EditContext", "EditError", "Method", "get_method", "method_names", "methods"]


def _load() -> dict[str, Method]:
    from pmedit.methods import alphaedit, emmet, encore, locft, memit, rome

    return {m.name: m for m in (
        rome.METHOD,
        memit.METHOD,
        emmet.METHOD,
        alphaedit.METHOD,
        encore.METHOD,
        locft.METHOD,
    )}


_REGISTRY: dict[str, Method] | None = None


def methods() -> dict[str, Method]:
    """name → Method, in registration order."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _load()
    return _REGISTRY


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def get_method(name: str) -> Method:
    """The registered method ``name`` (case-insensitive); ValueError listing the known ones."""
    reg = methods()
    key = str(name).lower()
    if key not in reg:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(reg)}")
    return reg[key]
