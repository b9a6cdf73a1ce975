"""pmedit: edit facts inside Llama-family language models (ROME, MEMIT, EMMET).

The public API is re-exported here lazily so that ``import pmedit`` stays cheap (no
transformers import until a model is needed).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "pmedit.models",
    "ModelSpec": "pmedit.models",
    "collect_second_moments": "pmedit.stats",
    "EditRequest": "pmedit.requests",
    "EditHparams": "pmedit.hparams",
    "Editor": "pmedit.editor",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pmedit' has no attribute {name!r}")
