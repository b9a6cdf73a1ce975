"""Files: atomic writes, verified tensor files, JSON/JSONL/YAML readers, machine info.

Every file pmedit writes goes through :func:`atomic_path`: the writer fills a temp name in the
target's directory (carrying the writer's pid) and the file is ``os.replace``d into place, so a
crash, Ctrl-C or a full disk leaves the old file or the new one, never half of one, and no
temp file. Temp files of writers killed by SIGKILL (which no ``finally`` survives) are found by
their dead pid and removed by the next writer of the same path (:func:`remove_stale_temps`).

Tensor files are safetensors with one JSON metadata entry that carries a SHA-256 over the
metadata and every tensor's name, dtype, shape and bytes (:func:`save_verified` /
:func:`load_verified`): a flipped bit anywhere is refused, naming the file.

This module sits at the bottom of pmedit's layering (it imports nothing from pmedit), so every
other module may use it. No pickle anywhere.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_META_KEY = "pmedit"

__all__ = [
    "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "remove_stale_temps",
    "remove_stale_temps_in",
    "tensor_digest", "save_verified", "load_verified", "read_json", "read_yaml", "read_mapping",
    "read_json_records", "read_text", "machine_info",
]


# --------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on a clean exit it replaces ``path``, else it is removed.

    ``suffix`` is appended to the temp name for writers that insist on an extension (numpy's
    ``savez`` adds ``.npz``, matplotlib picks the format from it). The file gets the permissions
    an ordinary ``open`` would give (``mkstemp``'s 0600 would hide results from other users).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced before the rename unless ``fsync=False``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temp files of ``path`` whose writer (the pid in their name) no longer runs.

    They can be as large as the file itself (an fp64 [d, d] sum is 1.6 GB at d = 14336). A
    writer that is still alive owns its file, so only dead writers' files go. Returns the
    removed paths.
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.debug("removing stale temp file %s", tmp)
            with contextlib.suppress(OSError):
                if tmp.is_dir():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
        except (PermissionError, OverflowError):  # alive and owned by someone else / not a pid
            pass
    return removed


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")


def remove_stale_temps_in(directory: str | os.PathLike) -> list[Path]:
    """:func:`remove_stale_temps` for every target in ``directory`` that has a temp file.

    A killed writer's temp outlives its target's next write when that write never comes (the
    file was written by another process meanwhile, or never asked for again), so cache readers
    sweep the directories they read.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    names = {m["name"] for p in d.iterdir() if (m := _TEMP_NAME.match(p.name))}
    return [t for name in sorted(names) for t in remove_stale_temps(d / name)]


# --------------------------------------------------------------------- verified tensor files
def tensor_digest(tensors: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> str:
    """SHA-256 over ``meta`` (as sorted JSON) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(dict(meta or {}), sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_verified(path: str | os.PathLike, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write safetensors with ``meta`` plus a checksum of everything, atomically."""
    from safetensors.torch import save_file

    meta = dict(meta)
    meta.pop("checksum", None)
    meta["checksum"] = tensor_digest(tensors, meta)
    payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(payload, str(tmp), metadata={_META_KEY: json.dumps(meta)})
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as SafetensorError
            m = re.search(r"os error (\d+)", str(e))
            if m is None:
                raise
            code = int(m.group(1))  # as the OSError it is: errno, strerror and the file
            raise OSError(code, os.strerror(code), str(path)) from e
    return Path(path)


def load_verified(path: str | os.PathLike, *, what: str = "file") -> tuple[dict[str, Any], dict]:
    """(tensors, meta) of a file written by :func:`save_verified`.

    ValueError naming ``path`` when it is unreadable (truncated, not safetensors), lacks the
    metadata, or its checksum does not match; FileNotFoundError when it does not exist.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors' own error types for truncated/garbled files
        raise ValueError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    if raw is None:
        raise ValueError(f"{path}: not a pmedit {what} (no {_META_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError(f"{path}: {what} metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: {what} metadata is not a JSON object")
    want = meta.pop("checksum", None)
    if want is None:
        raise ValueError(f"{path}: {what} carries no checksum")
    if tensor_digest(tensors, meta) != want:
        raise ValueError(f"{path}: {what} checksum mismatch (the file was changed or damaged after it was written)")
    return tensors, meta


# ---------------------------------------------------------------------------------- readers
def read_text(path: str | os.PathLike, *, what: str = "file") -> str:
    """UTF-8 text of ``path``; errors name the file (and the byte offset of bad UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    p = Path(path)
    text = read_text(p, what=what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_yaml(path: str | os.PathLike, *, what: str = "file") -> Any:
    """YAML through ``safe_load`` (tags never execute)."""
    import yaml

    p = Path(path)
    text = read_text(p, what=what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: invalid YAML: {e}") from None


def is_yaml(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def read_mapping(path: str | os.PathLike, *, what: str = "file") -> dict[str, Any]:
    """The mapping in a .json or .yaml/.yml file (by extension); anything else is an error."""
    data = read_yaml(path, what=what) if is_yaml(path) else read_json(path, what=what)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def read_json_records(path: str | os.PathLike, *, allow_single: bool = False) -> list:
    """The records of a JSON list, or of JSON lines (one value per line) for files ending in
    .jsonl; with ``allow_single`` a .json file holding one object is a list of one. Errors name
    the file and, for JSON lines, the line."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        data = []
        for ln, line in enumerate(read_text(p).split("\n"), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}, line {ln}: invalid JSON: {e.msg}") from None
    else:
        data = read_json(p)
    if allow_single and isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------ machine info
def machine_info() -> dict:
    """Where a figure was measured: date, platform, CPU, torch, threads, GPU."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = {
            "device": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
            "cuda_version": torch.version.cuda,
        }
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
