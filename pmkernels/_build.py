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
  PMKERNELS_MARCH=ARCH        C++ -march (default native on x86; the cache key then holds the
                              CPU model and flags, so a shared cache never loads foreign code)
  TORCH_CUDA_ARCH_LIST        CUDA targets (default: every visible GPU's, "9.0a" on Hopper);
                              read, never changed: it is set for the build only
  CUDA_HOME                   CUDA toolkit (torch's own lookup otherwise)

The cache key holds the sources and every csrc header, torch and its CUDA version, python, the
C++ target CPU and, for CUDA, the arch list and the exact nvcc build: an sm_80 build is never
reused on sm_90 ("no kernel image"), nor a build from another toolkit.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
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


def _arch_entry(major: int, minor: int) -> str:
    # 9.0a unlocks Hopper-only instructions (wgmma, TMA); plain 9.0 would not.
    return "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def _cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set, else every visible GPU's architecture (mixed machines too)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(_arch_entry(*c) for c in caps)


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU model and its feature flags (Linux), else the
    processor string. A build cache shared between different x86 CPUs must not reuse binaries."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", info, re.M)
    return f"{platform.machine()}|{model.group(1) if model else ''}|{flags.group(1) if flags else ''}"


def _march_flags() -> tuple[list[str], str]:
    """(C++ flags, cache-key part). PMKERNELS_MARCH=x86-64-v3 (say) builds a portable binary."""
    march = os.environ.get("PMKERNELS_MARCH", "native" if platform.machine() in ("x86_64", "AMD64") else "")
    if not march:
        return [], "march=none"
    return [f"-march={march}"], f"march={march}|" + (_cpu_identity() if march == "native" else "")


@functools.lru_cache(maxsize=None)
def _nvcc_version(cuda_home: str | None) -> str:
    """The toolkit's ``nvcc --version`` (its last line names the exact build)."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc-missing"
    try:
        res = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvcc-error:{type(err).__name__}"
    lines = res.stdout.strip().splitlines()
    return lines[-1] if lines else "nvcc-unknown"


def _cuda_home() -> str | None:
    from torch.utils import cpp_extension

    return os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or (
        "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)


def _cache_key(paths: list[str], cuda: bool, march_key: str, arch_list: str | None) -> str:
    """Hash of everything that changes the binary: the sources and every header beside them,
    torch (and its CUDA), python, the C++ target CPU, and for CUDA the arch list and toolkit."""
    h = hashlib.sha256()
    files = sorted({*map(Path, paths), *Path(paths[0]).parent.glob("*.h"), *Path(paths[0]).parent.glob("*.cuh")})
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}|{march_key}|{cuda}".encode())
    if cuda:
        h.update(f"|arch={arch_list}|nvcc={_nvcc_version(_cuda_home())}".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _env(**values: str | None):
    """Set environment variables for the duration of a build only (under _LOCK), then restore."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    march, march_key = _march_flags()
    arch_list = _cuda_arch_list() if cuda else None
    build_dir = _build_root() / f"{name}-{_cache_key(paths, cuda, march_key, arch_list)}"
    build_dir.mkdir(parents=True, exist_ok=True)

    kwargs = dict(
        name=name,
        sources=paths,
        extra_cflags=["-O3", "-std=c++17", "-fopenmp", *march],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=os.environ.get("PMKERNELS_VERBOSE_BUILD") == "1",
    )
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    env = dict(MAX_JOBS=os.environ.get("MAX_JOBS") or str(max(1, min(8, os.cpu_count() or 1))))
    if cuda:
        # torch reads TORCH_CUDA_ARCH_LIST from the environment; set it for this build only.
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    with _env(**env):
        return cpp_extension.load(**kwargs)
