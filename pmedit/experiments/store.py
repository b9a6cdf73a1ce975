"""A run directory: the config that made it, finished units, checkpoints, results.

Every write goes to a temporary name in the same directory and is ``os.replace``d, so a run
killed at any instant leaves either the old or the new file, never half of one; that is what
makes "resume at batch granularity" safe. JSON only (no pickle); tensors as safetensors.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from pmedit.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

STATE_FORMAT = "pmedit-experiment/1"


def write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write_bytes(path, buf.getvalue().encode())


class RunStore:
    """``state.json`` holds the config and each finished unit's result, keyed by unit name."""

    def __init__(self, root: str | Path, config: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"
        self.config = config
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.state_path}: corrupt run state ({e.msg}); delete the run directory to start over") from None
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"{self.state_path}: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
            if state.get("config") != config:
                changed = sorted(k for k in set(config) | set(state.get("config", {}))
                                 if config.get(k) != state.get("config", {}).get(k))
                raise ValueError(
                    f"{self.root} holds a run with a different config (fields {changed} differ); "
                    "use another out_dir or delete it to start over"
                )
            self.units: dict[str, Any] = state.get("units", {})
            log.info("%s: %d unit(s) already done", self.root, len(self.units))
        else:
            self.units = {}
            self._save()

    def _save(self) -> None:
        atomic_write_json(self.state_path, {"format": STATE_FORMAT, "config": self.config, "units": self.units})

    def __contains__(self, key: str) -> bool:
        return key in self.units

    def put(self, key: str, result: Any) -> None:
        self.units[key] = result
        self._save()

    def checkpoint_path(self, name: str) -> Path:
        return self.root / "checkpoints" / f"{name}.safetensors"
