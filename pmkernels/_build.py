"""Just-in-time builds of the C++/CUDA extensions, with a warning and a torch fallback.

Why JIT rather than setup.py: the extension must be compiled against the torch that is
actually installed, and an isolated pip build would download a second torch to do it. The
first call compiles with ninja into a cache directory (a minute on 2 cores); later calls load
the cached library in milliseconds. A missing compiler, a CPU-only torch asked for CUDA, or
``PMKERNELS_NO_BUILD=1`` gives one warning and ``None``: callers fall back to torch.

Environment:
  PMKERNELS_NO_BUILD=1        never compile; every compiled backend reports unavailable
  PMKERNELS_BUILD_DIR=DIR     cache directory (default ~/.cache/pmkernels/build)
  PMKERNELS_VERBOSE_BUILD=1   show compiler output
  TORCH_CUDA_ARCH_LIST        CUDA targets (default: the visible GPU's, "9.0a" on Hopper)
  CUDA_HOME                   CUDA toolkit (default /usr/local/cuda when it exists)
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_LOCK = threading.Lock()
_CACHE: dict[str, ModuleType | None] = {}


def csrc_dir() -> Path:
    """The C++/CUDA sources: the repository's csrc/, or the copy an installed wheel carries."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "_csrc"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"pmkernels: no csrc/ directory next to {here}")


def _build_root() -> Path:
    root = os.environ.get("PMKERNELS_BUILD_DIR")
    return Path(root) if root else Path.home() / ".cache" / "pmkernels" / "build"


def _cuda_arch_list() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    major, minor = torch.cuda.get_device_capability()
    # 9.0a unlocks Hopper-only instructions (wgmma, TMA); plain 9.0 would not.
    return "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def _unavailable_reason(cuda: bool) -> str | None:
    if os.environ.get("PMKERNELS_NO_BUILD") == "1":
        return "PMKERNELS_NO_BUILD=1"
    if cuda:
        if torch.version.cuda is None:
            return "this torch is a CPU-only build"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
    return None


def load_extension(name: str, sources: list[str], *, cuda: bool = False) -> ModuleType | None:
    """Compile (once) and import the extension ``name`` from ``sources`` (paths under csrc/).

    Returns None, after one warning, when it cannot be built here.
    """
    with _LOCK:
        if name in _CACHE:
            return _CACHE[name]
        reason = _unavailable_reason(cuda)
        module = None
        if reason is None:
            try:
                module = _compile(name, sources, cuda)
            except Exception as err:  # any compiler/linker failure means: use the fallback
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        if module is None and not (cuda and reason in ("this torch is a CPU-only build", "no CUDA device is visible")):
            # A CPU-only machine not building CUDA code is expected; everything else deserves a warning.
            warnings.warn(
                f"pmkernels: extension {name!r} is unavailable ({reason}); using the torch fallback",
                RuntimeWarning,
                stacklevel=3,
            )
        _CACHE[name] = module
        return module


def _compile(name: str, sources: list[str], cuda: bool) -> ModuleType:
    from torch.utils import cpp_extension

    src_root = csrc_dir()
    paths = [str(src_root / s) for s in sources]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(p)
    # Key the cache by everything that changes the binary: sources, torch, python, CPU.
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|{cuda}".encode())
    build_dir = _build_root() / f"{name}-{h.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)

    cflags = ["-O3", "-std=c++17", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        cflags.append("-march=native")  # the cache key includes the machine; CI builds its own
    kwargs = dict(
        name=name,
        sources=paths,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=os.environ.get("PMKERNELS_VERBOSE_BUILD") == "1",
    )
    if cuda:
        if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
        kwargs["extra_cuda_cflags"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    os.environ.setdefault("MAX_JOBS", str(max(1, min(8, os.cpu_count() or 1))))
    return cpp_extension.load(**kwargs)
