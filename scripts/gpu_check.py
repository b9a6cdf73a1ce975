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
    kern = ct._kernel().fn
    for dt, ieee in (("bf16", False), ("fp32", False), ("fp32", True)):
        for cfg in ct.gpu_configs():
            kw = dict(cfg.kwargs)
            for cc in ccs:
                sig = dict(x_ptr=f"*{dt}", mask_ptr="*u8", acc_ptr="*fp32", n="i32", d="i32", stride_xn="i32",
                           stride_xd="i32", stride_acc="i32", row_start="i32", rows_per_split="i32",
                           split_stride="i64")
                const = dict(HAS_MASK=True, CAST_FP32=False, IEEE=ieee, SPLIT=False, **kw)
                name = (f"covariance {dt}{' ieee' if ieee else (' tf32' if dt == 'fp32' else '')} "
                        f"B{kw['BLOCK']} K{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}")
                try:
                    r = _triton_compile(kern, sig, const, cc, cfg.num_warps, cfg.num_stages)
                except Exception as err:  # a config that does not compile is itself a finding
                    r = dict(arch=f"sm_{cc}", regs=None, error=f"{type(err).__name__}: {str(err)[:200]}")
                r["kernel"] = name
                rows.append(r)
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


# ============================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("resources")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_resources)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
