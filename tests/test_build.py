"""pmkernels._build: the JIT cache key changes with everything that changes the binary, and a
build leaves the process environment as it found it (no compiler runs here: load is faked)."""
from __future__ import annotations

import os

import pytest

from pmkernels import _build


@pytest.fixture
def src(tmp_path):
    (tmp_path / "k.cu").write_text("// kernel\n")
    (tmp_path / "k.cpp").write_text('#include "k.h"\n')
    (tmp_path / "k.h").write_text("#pragma once\n")
    return [str(tmp_path / "k.cpp"), str(tmp_path / "k.cu")]


def test_key_covers_headers_arch_toolkit_and_cpu(src, tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "_nvcc_version", lambda home: "Build cuda_13.0")
    base = _build._cache_key(src, True, "march=native|cpuA", "9.0a")
    assert base == _build._cache_key(src, True, "march=native|cpuA", "9.0a")
    assert base != _build._cache_key(src, True, "march=native|cpuA", "8.0")  # sm_80 build never reused on sm_90
    assert base != _build._cache_key(src, True, "march=native|cpuB", "9.0a")  # another CPU's -march=native
    assert base != _build._cache_key(src, False, "march=native|cpuA", None)
    (tmp_path / "k.h").write_text("#pragma once\n#define X 1\n")  # a header no source list names
    assert base != _build._cache_key(src, True, "march=native|cpuA", "9.0a")
    k13 = _build._cache_key(src, True, "march=native|cpuA", "9.0a")
    monkeypatch.setattr(_build, "_nvcc_version", lambda home: "Build cuda_12.8")  # another toolkit
    assert k13 != _build._cache_key(src, True, "march=native|cpuA", "9.0a")


def test_march_override_and_cpu_identity(monkeypatch):
    monkeypatch.setenv("PMKERNELS_MARCH", "x86-64-v3")
    flags, key = _build._march_flags()
    assert flags == ["-march=x86-64-v3"] and key == "march=x86-64-v3|"
    monkeypatch.setenv("PMKERNELS_MARCH", "native")
    flags, key = _build._march_flags()
    assert flags == ["-march=native"] and _build._cpu_identity() in key


def test_arch_list_from_env_or_every_visible_gpu(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    assert _build._cuda_arch_list() == "8.0;9.0a"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    caps = {0: (8, 0), 1: (9, 0), 2: (8, 0)}
    monkeypatch.setattr(_build.torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(_build.torch.cuda, "get_device_capability", lambda i: caps[i])
    assert _build._cuda_arch_list() == "8.0;9.0a"


def test_build_sets_arch_list_for_the_build_only(src, tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    seen = {}

    def fake_load(**kw):
        seen["arch"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        seen["dir"] = kw["build_directory"]
        return object()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_build, "csrc_dir", lambda: tmp_path)
    monkeypatch.setattr(_build, "_nvcc_version", lambda home: "Build cuda_13.0")
    monkeypatch.setattr(_build, "_cuda_arch_list", lambda: "9.0a")
    monkeypatch.setenv("PMKERNELS_BUILD_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    _build._compile("k", ["k.cpp", "k.cu"], True)
    assert seen["arch"] == "9.0a"
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # not leaked into the process
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    _build._compile("k", ["k.cpp", "k.cu"], True)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"


def test_missing_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "csrc_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.cpp"):
        _build._compile("k", ["nope.cpp"], False)
