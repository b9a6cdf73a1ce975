"""The helper behind scripts/gpu_check.sh, one sub-command per stage; also runs without a GPU.

    python scripts/gpu_check.py resources [--json OUT]   # ptxas/Triton resource report (no GPU needed)
    python scripts/gpu_check.py correctness OUT.jsonl    # every GPU backend vs fp64 on odd shapes
    python scripts/gpu_check.py timing OUT.json          # kernels vs cuBLAS / torch batched Cholesky
    python scripts/gpu_check.py report RESULTS_DIR       # one table of ratios, gpu_check.json

Why a resource report without a GPU: nvcc compiles the torch-free .cu files, and Triton can
compile for a ``GPUTarget`` it cannot run, so registers, spills and shared memory per kernel and
config (and whether Triton emitted wgmma) are known before any GPU is lent. ``correctness`` and
``timing`` need a CUDA torch and a GPU; every case is guarded so one failure does not hide the rest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ============================================================================ resources
def _ptxas_numbers(text: str) -> list[dict]:
    """Parse ``ptxas -v`` output into one record per entry function."""
    out, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
        if m:
            cur = dict(kernel=_demangle(m.group(1)), arch=m.group(2), regs=None, spill_stores=0, spill_loads=0,
                       stack=0, smem=0)
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return out


def _demangle(sym: str) -> str:
    try:
        res = subprocess.run(["c++filt", sym], capture_output=True, text=True, timeout=10)
        name = res.stdout.strip() or sym
    except (OSError, subprocess.SubprocessError):
        name = sym
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    return re.sub(r"\(.*\)$", "", name)  # drop the parameter list


def nvcc_resources(archs=("sm_90a", "sm_80")) -> list[dict]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [dict(kernel="(nvcc not found)", arch="-", regs=None)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cu in sorted((REPO / "csrc").glob("*.cu")):
            for arch in archs:
                cmd = [nvcc, "-c", "-O3", "-std=c++17", f"-arch={arch}", "-Xptxas", "-v", f"-I{REPO / 'csrc'}",
                       str(cu), "-o", str(Path(tmp) / "k.o")]
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if res.returncode != 0:
                    rows.append(dict(kernel=f"{cu.name}: nvcc failed", arch=arch, regs=None, error=res.stderr[-2000:]))
                    continue
                for r in _ptxas_numbers(res.stderr):
                    r["file"] = cu.name
                    rows.append(r)
    return rows


def _triton_ptxas() -> list[str]:
    """ptxas binaries to try, newest first: Triton's PTX may be newer than the toolkit's ptxas."""
    cands = []
    try:
        import triton

        bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        cands += [str(bin_dir / n) for n in ("ptxas-blackwell", "ptxas") if (bin_dir / n).exists()]
    except ImportError:
        pass
    if shutil.which("ptxas"):
        cands.append(shutil.which("ptxas"))
    return cands


def _triton_compile(fn, signature: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int) -> dict:
    """Compile one Triton kernel for sm_<cc> without a GPU; report registers, spills, shared."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    c = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = c.asm["ptx"]
    row = dict(arch=f"sm_{cc}{'a' if cc == 90 else ''}", smem=int(c.metadata.shared), wgmma=ptx.count("wgmma.mma_async"),
               mma_sync=ptx.count("mma.sync"), fma=ptx.count("fma.rn.f32"), regs=None, spill_stores=None, spill_loads=None,
               approx=ptx.count(".approx."))
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.ptx"
        p.write_text(ptx)
        for ptxas in _triton_ptxas():
            res = subprocess.run([ptxas, "-v", f"--gpu-name={row['arch']}", str(p), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True, timeout=600)
            parsed = _ptxas_numbers(res.stderr.replace("ptxas-blackwell info", "ptxas info"))
            if res.returncode == 0 and parsed:
                row.update(regs=parsed[0]["regs"], spill_stores=parsed[0]["spill_stores"],
                           spill_loads=parsed[0]["spill_loads"])
                break
    return row


def triton_resources(ccs=(90, 80)) -> list[dict]:
    """Every autotune config of the covariance kernel (per dtype) and the batched-solve kernel at n=64."""
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton  # noqa: F401
    except ImportError:
        return [dict(kernel="(triton not installed)", arch="-", regs=None)]
    from pmkernels import covariance_triton as ct

    rows = []
    kern = ct._kernel()
    if not hasattr(kern, "arg_names"):  # an Autotuner wraps the JITFunction
        kern = kern.fn

    def one(name, cc, cfg, sig, const):
        try:
            r = _triton_compile(kern, sig, const, cc, cfg.num_warps, cfg.num_stages)
        except Exception as err:  # a config that does not compile is itself a finding
            r = dict(arch=f"sm_{cc}{'a' if cc == 90 else ''}", regs=None, error=f"{type(err).__name__}: {str(err)[-200:]}")
        r["kernel"] = name
        rows.append(r)

    scal = dict(mask_ptr="*u8", n="i32", d="i32", stride_xn="i32", stride_acc="i32", rows_per_split="i32",
                split_stride="i64")
    kinds = (("bf16", False, "16bit"), ("fp32", False, "tf32"), ("fp32", True, "ieee"))
    for dt, ieee, kind in kinds:
        label = dt if dt == "bf16" else ("fp32 ieee" if ieee else "fp32 tf32")
        for cfg in ct.gpu_configs():
            for hm in (False, True):
                sig = dict(x_ptr=f"tensordesc<{dt}[{cfg.BLOCK_K}, {cfg.BLOCK}]>",
                           acc_ptr=f"tensordesc<fp32[{cfg.BLOCK}, {cfg.BLOCK}]>", **scal)
                const = dict(stride_xd=1, HAS_MASK=hm, IEEE=ieee, SPLIT=False, DESC=True, ACC_DESC=True, **cfg.kwargs)
                star = " (default)" if cfg == ct._CONFIGS[kind] else ""
                one(f"covariance TMA {label}{' mask' if hm else ''} {tuple(cfg)}{star}", 90, cfg, sig, const)
        cfg = ct._CONFIGS[kind]
        sig = dict(x_ptr=f"tensordesc<{dt}[{cfg.BLOCK_K}, {cfg.BLOCK}]>", acc_ptr="*fp32", **scal)
        one(f"covariance TMA {label} mask, split epilogue {tuple(cfg)}", 90, cfg, sig,
            dict(stride_xd=1, HAS_MASK=True, IEEE=ieee, SPLIT=True, DESC=True, ACC_DESC=False, **cfg.kwargs))
        cfg = ct._CONFIGS["pointer"]
        for cc in ccs:
            sig = dict(x_ptr=f"*{dt}", acc_ptr="*fp32", stride_xd="i32", **scal)
            one(f"covariance pointer {label} mask {tuple(cfg)} (default off-TMA)", cc, cfg, sig,
                dict(HAS_MASK=True, IEEE=ieee, SPLIT=False, DESC=False, ACC_DESC=False, **cfg.kwargs))
    from pmkernels import batched_solve_triton as bt
    from pmkernels._batched_solve_triton_kernels import _batched_chol_solve

    for dt in ("fp64", "fp32"):
        p = bt.launch_params(64, 16)
        for cc in ccs:
            sig = dict(W_ptr=f"*{dt}", T_ptr=f"*{dt}", X_ptr=f"*{dt}", info_ptr="*i32")
            const = {k: p[k] for k in ("NP", "MP", "BS", "NB", "BM", "NCH")}
            try:
                r = _triton_compile(_batched_chol_solve, sig, const, cc, p["num_warps"], 1)
            except Exception as err:
                r = dict(arch=f"sm_{cc}", regs=None, error=f"{type(err).__name__}: {str(err)[:200]}")
            r["kernel"] = f"batched_chol_solve {dt} n=64 m=16 w{p['num_warps']}"
            rows.append(r)
    return rows


def _fmt_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def cmd_resources(args) -> int:
    nv = nvcc_resources()
    tr = triton_resources()
    print("## nvcc (ptxas -v), csrc/*.cu\n")
    print(_fmt_table(nv, ["kernel", "arch", "regs", "spill_stores", "spill_loads", "stack", "smem"]))
    print("\n## Triton (compiled for a GPUTarget, no GPU; smem = dynamic shared bytes)\n")
    print(_fmt_table(tr, ["kernel", "arch", "regs", "spill_stores", "spill_loads", "smem", "wgmma", "mma_sync", "fma",
                          "approx", "error"]))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(nvcc=nv, triton=tr, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
                                              indent=1))
    return 0


# ============================================================================ correctness
U32 = 2.0 ** -24


def _jsonl(path: str | None, rec: dict) -> None:
    print(("ok   " if rec.get("ok") else "FAIL ") + " ".join(f"{k}={v}" for k, v in rec.items() if k != "ok"), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")


def _cov_case(backend: str, d: int, n: int, dtype, mask_kind: str, tf32: bool, layout: str, split: str | None):
    """One covariance case on the GPU against the fp64 reference and the test suite's bound."""
    import torch

    from pmkernels.covariance import SecondMoment

    g = torch.Generator(device="cuda").manual_seed(d * 7 + n)
    base = (torch.randn(n, d + 3, device="cuda", generator=g) * 3 + 0.25).to(dtype)
    x = base[:, :d] if layout == "sliced" else (base[:, :d].T.contiguous().T if layout == "transposed" else base[:, :d].contiguous())
    m = None
    if mask_kind == "random":
        m = torch.rand(n, device="cuda", generator=g) < 0.6
        x = x.clone() if layout == "contiguous" else x
        x[~m] = float("nan")  # padding is never read
    old = os.environ.get("PMKERNELS_TRITON_COV_SPLIT")
    if split:
        os.environ["PMKERNELS_TRITON_COV_SPLIT"] = split
    try:
        acc = SecondMoment(d, device="cuda", backend=backend, allow_tf32=tf32).update(x, m)
        got = acc.sum().cpu()
        count = acc.count
    finally:
        if split:
            if old is None:
                os.environ.pop("PMKERNELS_TRITON_COV_SPLIT", None)
            else:
                os.environ["PMKERNELS_TRITON_COV_SPLIT"] = old
    rows = x.double().cpu()
    if m is not None:
        rows = rows[m.cpu()]
    want = rows.T @ rows
    absprod = rows.abs().T @ rows.abs()
    per_product = 2.0 ** -8 if tf32 and dtype == torch.float32 else 0.0
    bound = (per_product + 2.0 * max(rows.shape[0], 1) * U32) * absprod + 1e-300
    worst = float(((got - want).abs() / bound).max()) if got.numel() else 0.0
    return dict(ok=bool(worst <= 1.0 and count == rows.shape[0] and torch.equal(got, got.T)), worst_over_bound=round(worst, 4),
                count=count, want_count=rows.shape[0])


def _solve_case(backend: str, b: int, n: int, m: int, dtype):
    import torch

    from pmkernels.batched_solve import batched_spd_solve

    g = torch.Generator(device="cuda").manual_seed(n * 13 + m)
    Q = torch.randn(b, n, n + 8, device="cuda", dtype=torch.float64, generator=g)
    A = Q @ Q.mT / (n + 8) + 0.05 * torch.eye(n, device="cuda", dtype=torch.float64)
    B = torch.randn(b, n, m, device="cuda", dtype=torch.float64, generator=g)
    res = batched_spd_solve(A.to(dtype), B.to(dtype), backend=backend)
    ref = torch.cholesky_solve(B, torch.linalg.cholesky(A))
    Ad, Xd = A, res.X.double()
    back = float(((Ad @ Xd - B).flatten(1).norm(dim=1) / (torch.linalg.matrix_norm(Ad) * Xd.flatten(1).norm(dim=1))).max())
    rel = float((Xd - ref).norm() / ref.norm())
    lim_back, lim_rel = (1e-13, 1e-9) if dtype == torch.float64 else (1e-5, 1e-2)
    return dict(ok=bool(back < lim_back and rel < lim_rel and not res.info.any() and res.backend == backend),
                backward=f"{back:.2e}", rel_err=f"{rel:.2e}")


def cmd_correctness(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device visible", flush=True)
        return 2
    fails = 0
    backends = args.backends.split(",")
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cov_cases = []
    for d in (1, 7, 127, 136, 576, 1536, 4099):
        for dt in ("bf16", "fp16", "fp32"):
            for mk in ("none", "random"):
                cov_cases.append((d, 97 if d > 1536 else 1000, dt, mk, False, "contiguous", None))
    cov_cases += [(1536, 5000, "fp32", "random", True, "contiguous", None), (4096, 3000, "fp32", "none", True, "contiguous", None),
                  (136, 3001, "bf16", "random", False, "sliced", None), (130, 513, "fp32", "none", False, "transposed", None),
                  (576, 70000, "bf16", "random", False, "contiguous", None),  # two chunks, auto split at d=576
                  (1536, 4097, "bf16", "none", False, "contiguous", "1"), (1536, 4097, "bf16", "random", False, "contiguous", "5")]
    for be in backends:
        if be == "solve":
            continue
        for (d, n, dt, mk, tf32, layout, split) in cov_cases:
            if split and be != "triton":
                continue
            rec = dict(check="covariance", backend=be, d=d, n=n, dtype=dt, mask=mk, tf32=tf32, layout=layout, split=split)
            t0 = time.time()
            try:
                rec.update(_cov_case(be, d, n, dts[dt], mk, tf32, layout, split))
            except Exception as err:
                rec.update(ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
            rec["s"] = round(time.time() - t0, 2)
            fails += not rec["ok"]
            _jsonl(args.out, rec)
    for be in [b for b in backends if b in ("triton", "cuda")] if "solve" in backends else []:
        for n, m, dt in ((1, 1, torch.float64), (33, 5, torch.float32), (64, 16, torch.float64), (64, 16, torch.float32),
                         (100, 7, torch.float64), (200, 9, torch.float64), (256, 40, torch.float32)):
            rec = dict(check="batched_solve", backend=be, b=37, n=n, m=m, dtype=str(dt).replace("torch.", ""))
            try:
                rec.update(_solve_case(be, 37, n, m, dt))
            except Exception as err:
                rec.update(ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
            fails += not rec["ok"]
            _jsonl(args.out, rec)
    return 1 if fails else 0


# ============================================================================ timing
def _time(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of `reps` CUDA-event-timed calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]


def cmd_timing(args) -> int:
    import torch

    budget = float(os.environ.get("GPU_CHECK_TIMING_BUDGET", "200"))
    t_start = time.time()
    rows, errors = [], []

    def bench(group, name, fn, reps, flops=None, baseline=False, env=None):
        if time.time() - t_start > budget:
            errors.append(dict(group=group, name=name, error="skipped: timing budget spent"))
            print(f"  SKIP {group} | {name}", flush=True)
            return
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            t = _time(fn, reps)
            rows.append(dict(group=group, name=name, s=t, baseline=baseline, tflops=flops / t / 1e12 if flops else None))
            print(f"  {group:34s} {name:46s} {t * 1e3:9.3f} ms" + (f" {flops / t / 1e12:7.1f} TF/s(eff)" if flops else ""), flush=True)
        except Exception as err:
            errors.append(dict(group=group, name=name, error=f"{type(err).__name__}: {str(err)[:300]}"))
            print(f"  FAIL {group} | {name}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            torch.cuda.synchronize()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    dev = torch.device("cuda")
    from pmkernels import covariance_cuda as cc
    from pmkernels import covariance_triton as ct
    from pmkernels.covariance import SecondMoment

    have = {"triton": ct.unavailable_reason(dev) is None, "cuda": cc.unavailable_reason(dev) is None}
    mm = torch.backends.cuda.matmul

    def precision(p):
        def set_():  # cuBLAS baselines only; the kernels under test never read this switch
            try:
                mm.fp32_precision = p
            except (AttributeError, RuntimeError):
                mm.allow_tf32 = p == "tf32"
        return set_

    D, N = args.d, args.n
    flops = 2.0 * N * D * D  # effective: as if the full product were computed, for every provider
    acc = torch.zeros(D, D, device=dev)
    x = torch.randn(N, D, device=dev).to(torch.bfloat16)
    g = f"cov bf16 d={D} n={N}"
    bench(g, "cuBLAS mm(x.T, x, out_dtype=fp32) + add", lambda: acc.add_(torch.mm(x.T, x, out_dtype=torch.float32)), 5, flops, True)
    bench(g, "cuBLAS x.T @ x (bf16 out)", lambda: x.T @ x, 5, flops, True)
    for be, mod in (("triton", ct), ("cuda", cc)):
        if have[be]:
            bench(g, f"{be} syrk_update_", lambda mod=mod: mod.syrk_update_(acc, x), 5, flops)
    if have["triton"]:
        for cfg in ct.gpu_configs():
            bench(g, f"triton config {tuple(cfg)}", lambda: ct.syrk_update_(acc, x), 3, flops,
                  env={"PMKERNELS_TRITON_COV_CONFIG": ",".join(map(str, cfg))})
    m = torch.rand(N, device=dev) < 0.9
    for be in ("triton", "cuda"):
        if have[be]:
            sm = SecondMoment(D, device=dev, backend=be)
            bench(g, f"SecondMoment[{be}].update(x, mask) (full API)", lambda sm=sm: sm.update(x, m), 3, flops)
            del sm
    del x
    xf = torch.randn(N, D, device=dev)
    g = f"cov fp32 d={D} n={N}"
    precision("tf32")()
    bench(g, "cuBLAS addmm tf32", lambda: acc.addmm_(xf.T, xf), 5, flops, True)
    precision("ieee")()
    bench(g, "cuBLAS addmm fp32 (ieee)", lambda: acc.addmm_(xf.T, xf), 3, flops, True)
    for be, mod in (("triton", ct), ("cuda", cc)):
        if have[be]:
            bench(g, f"{be} syrk_update_ tf32", lambda mod=mod: mod.syrk_update_(acc, xf, allow_tf32=True), 5, flops)
            bench(g, f"{be} syrk_update_ fp32 exact", lambda mod=mod: mod.syrk_update_(acc, xf), 2, flops)
    del xf, acc
    torch.cuda.empty_cache()
    # small d: where the token split matters (d = 1536 gives 78 tiles on 132 SMs)
    ds, ns = 1536, 65536
    xs = torch.randn(ns, ds, device=dev).to(torch.bfloat16)
    accs = torch.zeros(ds, ds, device=dev)
    fl = 2.0 * ns * ds * ds
    g = f"cov bf16 d={ds} n={ns}"
    bench(g, "cuBLAS mm(x.T, x, out_dtype=fp32) + add", lambda: accs.add_(torch.mm(xs.T, xs, out_dtype=torch.float32)), 10, fl, True)
    if have["triton"]:
        bench(g, "triton syrk_update_ (auto split)", lambda: ct.syrk_update_(accs, xs), 10, fl)
        bench(g, "triton syrk_update_ (no split)", lambda: ct.syrk_update_(accs, xs), 10, fl, env={"PMKERNELS_TRITON_COV_SPLIT": "1"})
    if have["cuda"]:
        bench(g, "cuda syrk_update_ (auto split)", lambda: cc.syrk_update_(accs, xs), 10, fl)
    del xs, accs
    torch.cuda.empty_cache()

    from pmkernels.batched_solve import batched_spd_solve

    smods = {}
    for nm in ("triton", "cuda"):
        mod = __import__(f"pmkernels.batched_solve_{nm}", fromlist=["x"])
        if mod.unavailable_reason(dev) is None:
            smods[nm] = mod
    b, n, mr = 1024, 64, 16
    for dtype in (torch.float64, torch.float32):
        Q = torch.randn(b, n, n + 8, device=dev, dtype=torch.float64)
        A = (Q @ Q.mT / (n + 8) + 0.1 * torch.eye(n, device=dev, dtype=torch.float64)).to(dtype)
        B = torch.randn(b, n, mr, device=dev, dtype=dtype)
        g = f"solve b={b} n={n} m={mr} {str(dtype).replace('torch.', '')}"
        bench(g, "torch batched cholesky + cholesky_solve", lambda: torch.cholesky_solve(B, torch.linalg.cholesky(A)), 20, None, True)
        for nm, mod in smods.items():
            bench(g, f"{nm} factor_solve (kernel)", lambda mod=mod: mod.factor_solve(A, B), 20)
            bench(g, f"batched_spd_solve[{nm}] (full API)", lambda nm=nm: batched_spd_solve(A, B, backend=nm), 20)
        if "triton" in smods:
            for w in ("2", "4", "8"):
                bench(g, f"triton factor_solve warps={w}", lambda: smods["triton"].factor_solve(A, B), 20,
                      env={"PMKERNELS_TRITON_SOLVE_WARPS": w})
    table = ratio_table(rows)
    Path(args.out).write_text(json.dumps(dict(rows=rows, table=table, errors=errors, gpu=torch.cuda.get_device_name(),
                                              torch=torch.__version__, cuda=torch.version.cuda,
                                              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), indent=1))
    print_table(table)
    return 1 if errors else 0


def ratio_table(rows: list[dict]) -> list[dict]:
    """Every candidate against every baseline of its group: ratio = baseline time / candidate time."""
    table = []
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for gname, rs in groups.items():
        bases = [r for r in rs if r["baseline"]]
        for c in (r for r in rs if not r["baseline"]):
            for b in bases:
                table.append(dict(group=gname, candidate=c["name"], baseline=b["name"], ratio=round(b["s"] / c["s"], 3),
                                  cand_ms=round(c["s"] * 1e3, 3), base_ms=round(b["s"] * 1e3, 3)))
    return table


def print_table(table: list[dict]) -> None:
    print("\n| group | candidate | baseline | candidate ms | baseline ms | ratio (>1: ours faster) |")
    print("|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['group']} | {t['candidate']} | {t['baseline']} | {t['cand_ms']} | {t['base_ms']} | {t['ratio']}x |")
    sys.stdout.flush()


# ============================================================================ junit
def cmd_junit(args) -> int:
    """On a GPU machine a skipped cuda test means a backend silently unavailable: a failure
    (except tests that need a second GPU)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(args.xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total = int(suite.get("tests", 0))
    bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skips = [(tc.get("name"), (tc.find("skipped").get("message") or "")) for tc in suite.iter("testcase")
             if tc.find("skipped") is not None]
    unexpected = [(nm, msg) for nm, msg in skips if "two GPUs" not in msg]
    print(f"pytest -m cuda: {total} tests, {bad} failures/errors, {len(skips)} skipped "
          f"({len(unexpected)} unexpected on a GPU machine)")
    for nm, msg in unexpected[:15]:
        print("  SKIPPED ON GPU:", nm, "-", msg[:160])
    return 1 if bad or unexpected or total == 0 else 0


# ============================================================================ report
def cmd_report(args) -> int:
    """Stages, correctness failures and the ratio table, in one gpu_check.json."""
    res = Path(args.results)
    stages = [json.loads(line) for line in (res / "stages.jsonl").read_text().splitlines()] if (res / "stages.jsonl").exists() else []
    checks = [json.loads(line) for line in (res / "checks.jsonl").read_text().splitlines()] if (res / "checks.jsonl").exists() else []
    timing = json.loads((res / "timing.json").read_text()) if (res / "timing.json").exists() else {}
    bad = [c for c in checks if not c.get("ok")]
    print("\n==== gpu_check summary ====")
    for st in stages:
        print(f"  stage {st['stage']:14s} rc={st['rc']} {st['s']}s")
    print(f"  correctness: {len(checks) - len(bad)}/{len(checks)} checks passed")
    for c in bad[:20]:
        print("   FAIL", {k: v for k, v in c.items() if k != "ok"})
    table = timing.get("table", [])
    if table:
        print_table(table)
    for e in timing.get("errors", []):
        print("  timing error:", e)
    ok = all(st["rc"] == 0 for st in stages) and not bad and bool(checks) and bool(table)
    (res / "gpu_check.json").write_text(json.dumps(dict(ok=ok, stages=stages, checks_passed=len(checks) - len(bad),
                                                        checks_total=len(checks), failures=bad, ratios=table,
                                                        timing_errors=timing.get("errors", []), gpu=timing.get("gpu"),
                                                        torch=timing.get("torch"), date=timing.get("date")), indent=1))
    print(f"  overall: {'PASS' if ok else 'FAIL'}; written {res / 'gpu_check.json'}")
    return 0 if ok else 1


# ============================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("resources")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_resources)
    p = sub.add_parser("correctness")
    p.add_argument("out", nargs="?")
    p.add_argument("--backends", default="triton,cuda,torch,solve", help="comma list; 'solve' adds the batched solves")
    p.set_defaults(fn=cmd_correctness)
    p = sub.add_parser("timing")
    p.add_argument("out")
    p.add_argument("--d", type=int, default=14336)
    p.add_argument("--n", type=int, default=65536)
    p.set_defaults(fn=cmd_timing)
    p = sub.add_parser("junit")
    p.add_argument("xml")
    p.set_defaults(fn=cmd_junit)
    p = sub.add_parser("report")
    p.add_argument("results")
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
