"""SecondMoment (pmkernels.covariance): every backend against an fp64 torch reference.

Tolerances: a backend sums each chunk of at most ``chunk_tokens`` rows in fp32 before the
fp64 master takes it. The classical dot-product bound |fl(Σ a_i b_i) − Σ a_i b_i| ≤ γ_m Σ|a_i b_i|
with γ_m ≈ m·u (u = 2⁻²⁴, m the number of rows summed in fp32, any summation order) therefore
bounds every entry by m·u·(|x|ᵀ|x|) + the fp64 flush rounding. The tests assert that bound
(with 2× slack for the fp64 adds); it cannot fail for a correct kernel, while a dropped,
doubled or unmasked row moves some diagonal entry by ≈ 1/m of its value, i.e. ≥ 4·10⁴× more
than u for m ≤ 400. bf16/fp16 inputs are compared with the reference over the *same* narrow
values upcast (their products are exact in fp32), so the same bound holds.
"""
from __future__ import annotations

import functools

import pytest
import torch

from pmkernels.covariance import SecondMoment

U32 = 2.0 ** -24
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- helpers
def _device_for(backend: str) -> str:
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


@functools.lru_cache(maxsize=None)
def _unavailable(backend: str) -> str | None:
    import importlib

    try:
        mod = importlib.import_module(f"pmkernels.covariance_{backend}")
    except ImportError as err:
        return f"pmkernels.covariance_{backend} does not import: {err}"
    return mod.unavailable_reason(torch.device(_device_for(backend)))


BACKENDS = [
    pytest.param("torch"),
    pytest.param("cpu"),
    pytest.param("triton"),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    reason = _unavailable(name)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable here: {reason}")
    return name


def reference(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The plain fp64 definition: S = Σ over kept rows of x xᵀ."""
    rows = x.reshape(-1, x.shape[-1]).double()
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    return rows.T @ rows, rows.shape[0]


def assert_close_to_reference(got: torch.Tensor, x: torch.Tensor, mask=None, *, rows_in_fp32: int, what=""):
    want, _ = reference(x, mask)
    rows = x.reshape(-1, x.shape[-1]).double()
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    absprod = rows.abs().T @ rows.abs()
    bound = 2.0 * max(rows_in_fp32, 1) * U32 * absprod + 1e-300
    err = (got.cpu().double() - want).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    if worst > 1.0:
        i, j = divmod(int((err / bound).argmax()), err.shape[1])
        raise AssertionError(
            f"{what}: entry ({i},{j}) got {got[i, j].item()!r} want {want[i, j].item()!r} "
            f"(|err| = {err[i, j].item():.3g}, bound {bound[i, j].item():.3g}, {worst:.3g}x over)"
        )
    assert torch.equal(got, got.T), f"{what}: sum() is not exactly symmetric"


def _make(n_shape, d, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*n_shape, d, generator=g) * 3 + 0.25  # a non-zero mean, like real keys
    return x.to(dtype).to(device)


def _mask(kind, shape, seed=0, device="cpu"):
    if kind == "none":
        return None
    if kind == "all-false":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(shape, generator=g) < 0.6).to(device)


# ----------------------------------------------------------------------------- the grid
DIMS = [1, 7, 64, 127, 1536]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mask_kind", ["none", "random", "all-false"])
@pytest.mark.parametrize("d", DIMS)
def test_matches_fp64_reference(backend, d, mask_kind, dtype):
    if backend == "triton" and _device_for("triton") == "cpu" and d == 1536 and (dtype != "bf16" or mask_kind != "random"):
        pytest.skip("the Triton interpreter runs d=1536 in one combination only (seconds per program grid)")
    dev = _device_for(backend)
    shape = (3, 7) if d == 1536 else (4, 37)  # d=1536 with few tokens: 21 rows
    x = _make(shape, d, DTYPES[dtype], seed=d, device=dev)
    m = _mask(mask_kind, shape, seed=d, device=dev)
    acc = SecondMoment(d, device=dev, backend=backend)
    assert acc.backend == backend
    acc.update(x, m)
    _, n = reference(x.cpu(), None if m is None else m.cpu())
    assert acc.count == n
    if n == 0:
        assert torch.count_nonzero(acc.sum()) == 0
        with pytest.raises(ValueError, match="count == 0"):
            acc.mean()
        return
    s = acc.sum()
    assert s.dtype == torch.float64 and s.shape == (d, d) and s.device.type == torch.device(dev).type
    assert_close_to_reference(s, x.cpu(), None if m is None else m.cpu(), rows_in_fp32=n, what=f"{backend} d={d}")
    torch.testing.assert_close(acc.mean(), s / n, rtol=0, atol=0)


@pytest.mark.parametrize("sizes", [(23,), (5, 5, 5), (3, 0, 9, 1, 12), (11, 4)])
def test_chunk_boundaries(backend, sizes):
    """Updates that straddle, fill exactly, or split across the fp32 chunk of 5 rows."""
    dev = _device_for(backend)
    d = 19
    acc = SecondMoment(d, device=dev, backend=backend, chunk_tokens=5)
    xs = [_make((k,), d, torch.float32, seed=10 + i, device=dev) for i, k in enumerate(sizes)]
    for x in xs:
        acc.update(x)
    allx = torch.cat([x.cpu() for x in xs])
    assert acc.count == allx.shape[0]
    assert_close_to_reference(acc.sum(), allx, rows_in_fp32=5, what=f"{backend} chunks {sizes}")
    # The pending fp32 chunk is read without being flushed: reading never changes later rounding.
    before = acc._pending
    acc.sum()
    assert acc._pending == before


def test_non_contiguous_and_strided_input(backend):
    dev = _device_for(backend)
    d = 33
    base = _make((50, 2 * d + 3), 1, torch.float32, device=dev)[..., 0]  # [50, 69]
    x = base[::2, 1 : 2 * d + 1 : 2]  # both dims strided: [25, 33]
    assert not x.is_contiguous()
    xt = _make((d, 40), 1, torch.bfloat16, seed=3, device=dev)[..., 0].T  # transposed view [40, 33]
    acc = SecondMoment(d, device=dev, backend=backend)
    acc.update(x).update(xt)
    allx = torch.cat([x.cpu().float(), xt.cpu().float()])
    assert_close_to_reference(acc.sum(), allx, rows_in_fp32=allx.shape[0], what=f"{backend} strided")


def test_inputs_that_require_grad_build_no_graph(backend):
    dev = _device_for(backend)
    w = torch.randn(6, 9, device=dev, requires_grad=True)
    x = torch.randn(12, 6, device=dev) @ w  # an activation captured with grad enabled
    acc = SecondMoment(9, device=dev, backend=backend).update(x).update(x)
    assert not acc.sum().requires_grad and acc._acc.grad_fn is None
    assert_close_to_reference(acc.sum(), torch.cat([x, x]).detach().cpu(), rows_in_fp32=24, what=f"{backend} grad")


def test_merge_equals_one_accumulator(backend):
    dev = _device_for(backend)
    d = 45
    x = _make((130,), d, torch.float32, device=dev)
    m = _mask("random", (130,), device=dev)
    one = SecondMoment(d, device=dev, backend=backend, chunk_tokens=64).update(x, m)
    a = SecondMoment(d, device=dev, backend=backend, chunk_tokens=64).update(x[:70], m[:70])
    b = SecondMoment(d, device=dev, backend="torch", chunk_tokens=64).update(x[70:], m[70:])
    assert a.merge(b) is a
    assert a.count == one.count == int(m.sum())
    assert_close_to_reference(a.sum(), x.cpu(), m.cpu(), rows_in_fp32=64, what=f"{backend} merged")
    assert_close_to_reference(one.sum(), x.cpu(), m.cpu(), rows_in_fp32=64, what=f"{backend} single")


def test_state_dict_round_trip_through_safetensors(backend, tmp_path):
    from safetensors.torch import load_file, save_file

    dev = _device_for(backend)
    d = 29
    acc = SecondMoment(d, device=dev, backend=backend, chunk_tokens=16)
    first = _make((37,), d, torch.float16, device=dev)
    acc.update(first)  # leaves a pending fp32 chunk
    state = acc.state_dict()
    assert set(state) == {"sum", "count"}
    assert state["sum"].dtype == torch.float64 and state["count"].dtype == torch.int64
    path = tmp_path / "c0.safetensors"
    save_file(state, str(path))
    loaded = load_file(str(path))
    other = SecondMoment(d, device=dev, backend=backend).load_state_dict(loaded)
    assert other.count == acc.count == 37
    assert torch.equal(other.sum(), acc.sum())
    # Accumulation continues identically after a reload.
    more = _make((9,), d, torch.float32, seed=5, device=dev)
    acc.update(more)
    other.update(more)
    allx = torch.cat([first.cpu().float(), more.cpu()])
    for a in (acc, other):  # the same sum up to where the fp32 chunks were flushed
        assert a.count == 46
        assert_close_to_reference(a.sum(), allx, rows_in_fp32=16, what=f"{backend} reloaded")


# ----------------------------------------------------------------------------- numerics at scale
@pytest.mark.slow
def test_ten_million_tokens_stay_within_1e_5_while_fp32_running_sum_drifts():
    """10⁷ fp32 tokens at d=16: ours (fp32 chunks of 64k rows flushed into fp64) against the
    fp64 reference, and a MEMIT-style fp32 running sum of per-batch xᵀx as the contrast.

    The drift comes from the running sum growing past each batch, not from data variety, so
    the stream cycles through four random batches (their fp64 products computed once)."""
    d, total, batch = 16, 10**7, 1 << 18
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(batch, d, generator=g) + 0.5 for _ in range(4)]
    pool_ref = [x.double().T @ x.double() for x in pool]
    ours = SecondMoment(d)  # auto: the compiled cpu backend when it builds
    ref = torch.zeros(d, d, dtype=torch.float64)
    naive = torch.zeros(d, d, dtype=torch.float32)
    done, k = 0, 0
    while done < total:
        x = pool[k % 4][: total - done]
        ours.update(x)
        ref += pool_ref[k % 4] if x.shape[0] == batch else x.double().T @ x.double()
        for xb in x.split(4096):  # the reference code's fp32 accumulation, 4k-token batches
            naive.addmm_(xb.T, xb)
        done += x.shape[0]
        k += 1
    assert ours.count == total
    rel = lambda s: ((s.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    err_ours, err_naive = rel(ours.sum()), rel(naive)
    assert err_ours < 1e-5, err_ours
    # The contrast: the naive running sum is already two orders of magnitude worse at 10⁷
    # (≈3e-6 here; it grows with the token count, to ~1e-1 at 10⁸ per-token adds).
    assert err_naive > 30 * err_ours, (err_naive, err_ours)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(backend):
    dev = _device_for(backend)
    acc = SecondMoment(8, device=dev, backend=backend)
    x = _make((4, 5), 8, torch.float32, device=dev)
    with pytest.raises(ValueError, match=r"last dimension must be dim=8"):
        acc.update(_make((4,), 9, torch.float32, device=dev))
    with pytest.raises(ValueError, match=r"last dimension"):
        acc.update(torch.tensor(1.0, device=dev))
    with pytest.raises(ValueError, match=r"mask has shape \(4, 4\).*x.shape\[:-1\] = \(4, 5\)"):
        acc.update(x, torch.ones(4, 4, dtype=torch.bool, device=dev))
    with pytest.raises(TypeError, match=r"mask has dtype torch.float32"):
        acc.update(x, torch.ones(4, 5, device=dev))
    with pytest.raises(TypeError, match=r"dtype torch.int64"):
        acc.update(torch.ones(3, 8, dtype=torch.int64, device=dev))
    with pytest.raises(TypeError, match=r"dtype torch.float64"):
        acc.update(torch.ones(3, 8, dtype=torch.float64, device=dev))
    with pytest.raises(TypeError, match="torch.Tensor"):
        acc.update([[0.0] * 8])
    assert acc.count == 0 and torch.count_nonzero(acc.sum()) == 0  # nothing half-applied


def test_nonfinite_rows_raise_with_count_or_are_skipped(backend):
    dev = _device_for(backend)
    x = _make((10,), 6, torch.float32, device=dev)
    x[2, 1] = float("nan")
    x[5, 0] = float("inf")
    x[7, 3] = -float("inf")
    acc = SecondMoment(6, device=dev, backend=backend)
    with pytest.raises(ValueError, match=r"3 of 10 rows hold NaN or Inf \(first at flattened row 2\)"):
        acc.update(x)
    assert acc.count == 0
    # A non-finite padding row is never read, so it is no error.
    m = torch.ones(10, dtype=torch.bool, device=dev)
    m[[2, 5, 7]] = False
    acc.update(x, m)
    assert acc.count == 7
    skip = SecondMoment(6, device=dev, backend=backend, on_nonfinite="skip")
    skip.update(x)
    assert skip.count == 7 and skip.skipped == 3
    keep = torch.ones(10, dtype=torch.bool)
    keep[[2, 5, 7]] = False
    assert_close_to_reference(skip.sum(), x.cpu(), keep, rows_in_fp32=7, what=f"{backend} skip")
    torch.testing.assert_close(skip.sum(), acc.sum(), rtol=0, atol=0)


def test_empty_batch_is_a_no_op(backend):
    dev = _device_for(backend)
    acc = SecondMoment(5, device=dev, backend=backend)
    acc.update(torch.empty(0, 5, device=dev))
    acc.update(torch.empty(3, 0, 5, dtype=torch.bfloat16, device=dev), torch.empty(3, 0, dtype=torch.bool, device=dev))
    assert acc.count == 0 and acc._acc is None
    with pytest.raises(ValueError, match="count == 0"):
        acc.mean()


def test_constructor_and_merge_validation():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        SecondMoment(0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        SecondMoment(4, chunk_tokens=65537)
    with pytest.raises(ValueError, match="on_nonfinite"):
        SecondMoment(4, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="unknown backend"):
        SecondMoment(4, backend="fast")
    with pytest.raises(ValueError, match=r"dims differ \(4 vs 5\)"):
        SecondMoment(4, backend="torch").merge(SecondMoment(5, backend="torch"))
    with pytest.raises(TypeError, match="SecondMoment"):
        SecondMoment(4, backend="torch").merge(torch.zeros(4, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_backend_on_cpu_is_an_error():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        SecondMoment(4, device="cpu", backend="cuda")


@pytest.mark.cuda
def test_cuda_accumulator_rejects_cpu_tensors():
    for backend in ("cuda", "triton", "torch"):
        if _unavailable(backend) is not None:
            continue
        acc = SecondMoment(4, device="cuda", backend=backend)
        with pytest.raises(ValueError, match="is on cpu"):
            acc.update(torch.ones(2, 4))


def test_load_state_dict_validates():
    acc = SecondMoment(3, backend="torch")
    good = {"sum": torch.eye(3, dtype=torch.float64), "count": torch.tensor(2)}
    acc.load_state_dict(good)
    assert acc.count == 2 and torch.equal(acc.sum(), torch.eye(3, dtype=torch.float64))
    bad = [
        ({"sum": torch.eye(3, dtype=torch.float64)}, r"missing \['count'\]"),
        ({**good, "extra": torch.zeros(1)}, r"unexpected \['extra'\]"),
        ({**good, "sum": torch.eye(4, dtype=torch.float64)}, r"shape \(3, 3\), got torch.float64 \(4, 4\)"),
        ({**good, "sum": torch.eye(3)}, r"float64 tensor.*got torch.float32"),
        ({**good, "count": torch.tensor(2.0)}, "'count' must be a one-element int64"),
        ({**good, "count": torch.tensor(-1)}, "negative"),
        ({**good, "sum": torch.tensor([[1.0, 2.0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)}, "not symmetric"),
        ({**good, "sum": torch.full((3, 3), float("nan"), dtype=torch.float64)}, "NaN"),
    ]
    for state, pat in bad:
        with pytest.raises(ValueError, match=pat):
            SecondMoment(3, backend="torch").load_state_dict(state)


# ----------------------------------------------------------------------------- the cpu backend
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("block,cols", [(1, 0), (5, 0), (16, 0), (4, 4), (5, 3), (6, 11)])
def test_cpu_backend_small_tiles(monkeypatch, block, cols, dtype):
    """The default tiling (128-row blocks) covers small dims in one GEMM; force many block
    rows and column spans (0 = whole block rows, MKL-threaded), including ragged ones and
    spans not aligned to the blocks, so the upper-triangle tiling itself is exercised."""
    if _unavailable("cpu") is not None:
        pytest.skip(_unavailable("cpu"))
    monkeypatch.setenv("PMKERNELS_COV_BLOCK", str(block))
    monkeypatch.setenv("PMKERNELS_COV_TILE_COLS", str(cols))
    d = 23
    x = _make((3, 11), d, DTYPES[dtype], seed=block)
    m = _mask("random", (3, 11), seed=block)
    for mask in (None, m):
        acc = SecondMoment(d, backend="cpu").update(x, mask)
        assert_close_to_reference(acc.sum(), x, mask, rows_in_fp32=33, what=f"cpu block={block}")


def test_auto_falls_back_to_torch_when_the_extension_cannot_build(monkeypatch):
    from pmkernels import covariance_cpu

    monkeypatch.delenv("PMKERNELS_BACKEND", raising=False)
    monkeypatch.setattr(covariance_cpu, "_ext", lambda: None)
    assert "could not be built" in covariance_cpu.unavailable_reason(torch.device("cpu"))
    assert SecondMoment(4).backend == "torch"
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run on cpu: the C\\+\\+ extension"):
        SecondMoment(4, backend="cpu")


def test_env_override_picks_the_backend(monkeypatch):
    monkeypatch.setenv("PMKERNELS_BACKEND", "torch")
    assert SecondMoment(4).backend == "torch"


def test_triton_tile_pair_enumeration_covers_the_upper_triangle_once():
    """The kernel's pid → (i, j) map (fp32 sqrt + two fix-ups), replayed in numpy float32 up
    to t = 600 tiles per side (d = 14336 needs t = 112 at BLOCK 128, 224 at BLOCK 64)."""
    import numpy as np

    t = 600
    pid = np.arange(t * (t + 1) // 2, dtype=np.int64)
    j = ((np.sqrt(np.float32(8.0) * pid.astype(np.float32) + np.float32(1.0)) - np.float32(1.0)) * np.float32(0.5))
    j = j.astype(np.int64)
    j = np.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    j = np.where(j * (j + 1) // 2 > pid, j - 1, j)
    i = pid - j * (j + 1) // 2
    assert (i >= 0).all() and (i <= j).all() and (j < t).all()
    assert len(np.unique(i * t + j)) == len(pid)


@pytest.mark.cuda
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
@pytest.mark.parametrize("d", [64, 127, 1536])
def test_gpu_tf32_when_allowed(gpu_backend, d):
    """allow_tf32 multiplies fp32 inputs with 10-bit mantissas: each product is off by at most
    ~2·2⁻¹¹ relative, so the bound (with 2× slack) is (2⁻⁸ + m·u)·(|x|ᵀ|x|) instead of m·u·(|x|ᵀ|x|)."""
    if _unavailable(gpu_backend) is not None:
        pytest.skip(_unavailable(gpu_backend))
    x = _make((300,), d, torch.float32, device="cuda")
    acc = SecondMoment(d, device="cuda", backend=gpu_backend, allow_tf32=True).update(x)
    want, _ = reference(x.cpu())
    absprod = x.cpu().double().abs().T @ x.cpu().double().abs()
    err = (acc.sum().cpu() - want).abs()
    assert (err <= (2.0 ** -8 + 2 * 300 * U32) * absprod).all()


# ----------------------------------------------------------------------------- Triton paths
def _triton_or_skip():
    if _unavailable("triton") is not None:
        pytest.skip(_unavailable("triton"))
    return _device_for("triton")


@pytest.mark.parametrize("split", [1, 3, 7])
@pytest.mark.parametrize("tma", ["1", "0"])
@pytest.mark.parametrize("d,n,dtype,mask_kind", [(64, 301, "bf16", "random"), (72, 130, "fp32", "none"),
                                                 (7, 97, "fp16", "random"), (136, 65, "bf16", "none")])
def test_triton_split_and_load_paths_match_fp64(monkeypatch, split, tma, d, n, dtype, mask_kind):
    """Token splits (fp32 partials summed in a fixed order; ragged last split) and both load
    paths (TMA descriptors where rows are 16-byte aligned, per-element pointers otherwise)."""
    from pmkernels import covariance_triton as ct

    dev = _triton_or_skip()
    monkeypatch.setenv("PMKERNELS_TRITON_COV_SPLIT", str(split))
    monkeypatch.setenv("PMKERNELS_TRITON_COV_TMA", tma)
    x = _make((n,), d, DTYPES[dtype], seed=d + n, device=dev)
    m = _mask(mask_kind, (n,), seed=n, device=dev)
    if m is not None:
        x[~m] = float("nan")  # padding may hold anything: it must never be read
    acc = torch.zeros(d, d, device=dev)
    ct.syrk_update_(acc, x, m)
    ct.syrk_update_(acc, x, m)  # accumulates, the second time through the read-add-write epilogue
    got = torch.triu(acc.cpu().double())
    got = got + got.triu(1).T
    xx = x.cpu()
    if m is not None:
        xx = torch.where(m.cpu()[:, None], xx, torch.zeros_like(xx))
    both = torch.cat([xx, xx])
    assert_close_to_reference(got, both, rows_in_fp32=2 * n, what=f"triton split={split} tma={tma}")


def test_triton_split_count_fills_the_gpu(monkeypatch):
    from pmkernels import covariance_triton as ct

    monkeypatch.delenv("PMKERNELS_TRITON_COV_SPLIT", raising=False)
    monkeypatch.setattr(ct, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert ct.split_count(78, 65536, cuda) == 4  # d = 1536 at BLOCK 128: 78 tiles -> 312 programs
    assert ct.split_count(6216, 65536, cuda) == 1  # d = 14336: tiles alone fill the GPU
    assert ct.split_count(1, 3000, cuda) == 2  # bounded by >= 1024 rows per split
    assert ct.split_count(1, 65536, cuda) == 32  # and by _MAX_SPLIT
    assert ct.split_count(78, 65536, torch.device("cpu")) == 1
    monkeypatch.setenv("PMKERNELS_TRITON_COV_SPLIT", "0")
    with pytest.raises(ValueError, match="must be >= 1"):
        ct.split_count(78, 100, cuda)


def test_triton_config_override_is_validated(monkeypatch):
    from pmkernels import covariance_triton as ct

    monkeypatch.setenv("PMKERNELS_TRITON_COV_CONFIG", "64,32,4,3")
    assert ct._config_for("16bit") == ct.Config(64, 32, 4, 3)
    monkeypatch.setenv("PMKERNELS_TRITON_COV_CONFIG", "64,32")
    with pytest.raises(ValueError, match="four ints"):
        ct._config_for("16bit")
    monkeypatch.setenv("PMKERNELS_TRITON_COV_CONFIG", "96,32,4,3")
    with pytest.raises(ValueError, match="powers of two"):
        ct._config_for("16bit")


@pytest.mark.cuda
def test_triton_and_cuda_on_a_second_gpu():
    """device_map puts layers on cuda:1+: kernels must launch on the tensors' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = f"cuda:{torch.cuda.device_count() - 1}"
    x = _make((300,), 136, torch.bfloat16, device=dev)
    for backend in ("triton", "cuda"):
        if _unavailable(backend) is not None:
            continue
        acc = SecondMoment(136, device=dev, backend=backend).update(x)
        assert_close_to_reference(acc.sum(), x.cpu(), rows_in_fp32=300, what=f"{backend} on {dev}")


# ----------------------------------------------------------------------------- deferred checks
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_deferred_checks_match_immediate_ones(backend, mask_kind, on_nonfinite):
    """defer_checks (the CUDA default: no host sync in update) gives the same sums, counts and
    skips as the immediate checks; a failure under "raise" surfaces at the next read and the
    sums are those before the failing update (it and every later one are left out)."""
    dev = _device_for(backend)
    d = 24
    xs = [_make((3, 11), d, torch.float32, seed=s, device=dev) for s in range(3)]
    ms = [_mask(mask_kind, (3, 11), seed=s, device=dev) for s in range(3)]
    xs[1][0, 4, 2] = float("nan")
    xs[1][2, 7, 0] = float("inf")
    if ms[1] is not None:
        ms[1][0, 4] = ms[1][2, 7] = True  # the bad rows are real rows, not padding
        ms[1][1, 3] = False
        xs[1][1, 3, 5] = float("nan")  # a non-finite padding row is never an error
    eager = SecondMoment(d, device=dev, backend=backend, on_nonfinite=on_nonfinite, defer_checks=False)
    lazy = SecondMoment(d, device=dev, backend=backend, on_nonfinite=on_nonfinite, defer_checks=True)
    lazy.update(xs[0], ms[0])
    eager.update(xs[0], ms[0])
    lazy.update(xs[1], ms[1])  # never raises here: nothing synchronises
    lazy.update(xs[2], ms[2])
    if on_nonfinite == "skip":
        eager.update(xs[1], ms[1]).update(xs[2], ms[2])
        assert lazy.count == eager.count and lazy.skipped == eager.skipped == 2
        torch.testing.assert_close(lazy.sum(), eager.sum(), rtol=1e-12, atol=1e-9)
        return
    with pytest.raises(ValueError, match=r"2 of 33 rows hold NaN or Inf \(first at flattened row 4\)"):
        eager.update(xs[1], ms[1])
    for read in (lambda a: a.count, lambda a: a.sum(), lambda a: a.state_dict(), lambda a: a.mean()):
        with pytest.raises(ValueError, match=r"2 of 33 rows hold NaN or Inf \(first at flattened row 4\) in update call 2"):
            read(lazy)
    # what was accumulated is exactly the first update, as after the immediate raise
    assert eager.count == (33 if ms[0] is None else int(ms[0].sum()))
    assert lazy._count == eager.count
    torch.testing.assert_close((lazy._master + lazy._acc).triu(), eager.sum().triu(), rtol=1e-12, atol=1e-9)


def test_defer_checks_default_and_validation():
    assert SecondMoment(4, backend="torch").defer_checks is False  # CPU: immediate
    with pytest.raises(TypeError, match="defer_checks"):
        SecondMoment(4, backend="torch", defer_checks="yes")


@pytest.mark.cuda
def test_cuda_update_does_not_synchronise():
    """The point of deferral: update() queues work and returns with no host sync."""
    for backend in ("cuda", "triton", "torch"):
        if _unavailable(backend) is not None:
            continue
        acc = SecondMoment(256, device="cuda", backend=backend)
        assert acc.defer_checks
        x = torch.randn(4096, 256, device="cuda")
        m = torch.rand(4096, device="cuda") < 0.5
        acc.update(x, m)  # warm-up (compiles)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            acc.update(x, m)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert acc.count == 2 * int(m.sum())


def test_gpu_order_puts_triton_first_when_asked(monkeypatch):
    from pmkernels._dispatch import select_backend

    monkeypatch.delenv("PMKERNELS_BACKEND", raising=False)
    cuda = torch.device("cuda", 0)
    ok = {"cuda": lambda dev: None, "triton": lambda dev: None}
    assert select_backend("covariance", "auto", cuda, ok) == "cuda"
    assert select_backend("covariance", "auto", cuda, ok, gpu_order=("triton", "cuda", "torch")) == "triton"
    ok["triton"] = lambda dev: "no triton"
    assert select_backend("covariance", "auto", cuda, ok, gpu_order=("triton", "cuda", "torch")) == "cuda"
