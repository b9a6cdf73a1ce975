#!/usr/bin/env bash
# The project's one-shot GPU check, for a fresh H100/H200 machine (run from anywhere):
#   OUT=/some/dir bash scripts/gpu_check.sh        # at most ~8 minutes (GPU_CHECK_BUDGET_S=470)
# Stages, each under its own time limit (a failing stage is recorded and the rest still run):
#   env -> install (only if no CUDA torch) -> [build both CUDA extensions + resource report, in
#   the background] || Triton correctness -> pytest -m cuda -> CUDA correctness -> timing -> report
# Results in $OUT: gpu_check.log, stages.jsonl, checks.jsonl, pytest_cuda.xml, resources.json,
# timing.json and gpu_check.json (stages, failures and the table of ratios). The helper is
# scripts/gpu_check.py; its sub-commands also run one by one. Exit 0 only if everything passed.
# GPU_CHECK_SKIP=install,resources (say) skips stages by name.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY=${PYTHON:-python3}
RES="${OUT:-/tmp/pmedit_gpu_check}"
mkdir -p "$RES"
WORK="$(mktemp -d /tmp/pmedit_gpu_check.XXXX)"
exec > >(tee -a "$RES/gpu_check.log") 2>&1
T0=$(date +%s)
DEADLINE=$((T0 + ${GPU_CHECK_BUDGET_S:-470}))
: > "$RES/stages.jsonl"; : > "$RES/checks.jsonl"
# A fresh build cache and Triton cache: nothing from another machine is reused.
export PMKERNELS_BUILD_DIR="$WORK/build" TRITON_CACHE_DIR="$WORK/triton" MAX_JOBS=${MAX_JOBS:-16}
export REPO PY RES PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET PMKERNELS_NO_BUILD PMKERNELS_BACKEND PMKERNELS_TRITON_COV_CONFIG PMKERNELS_TRITON_COV_SPLIT
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
# stage NAME WANT_S RESERVE_S cmd...: limit = min(WANT, time left - RESERVE kept for later stages)
stage() {
  local name=$1 want=$2 reserve=$3; shift 3
  if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
    say "SKIP $name (GPU_CHECK_SKIP)"; echo "{\"stage\":\"$name\",\"rc\":\"skipped\",\"s\":0}" >> "$RES/stages.jsonl"; return
  fi
  local lim=$(( DEADLINE - $(date +%s) - reserve )); (( lim > want )) && lim=$want
  if (( lim < 10 )); then
    say "SKIP $name: no time left"; echo "{\"stage\":\"$name\",\"rc\":\"skipped\",\"s\":0}" >> "$RES/stages.jsonl"; return
  fi
  say "=== $name (limit ${lim}s)"
  local t=$(date +%s); timeout -k 10 "$lim" "$@"; local rc=$?; local dt=$(( $(date +%s) - t ))
  (( rc == 124 || rc == 137 )) && say "!!! $name TIMED OUT after ${dt}s"
  (( rc != 0 )) && say "!!! $name FAILED rc=$rc (${dt}s)" || say "--- $name ok (${dt}s)"
  echo "{\"stage\":\"$name\",\"rc\":$rc,\"s\":$dt}" >> "$RES/stages.jsonl"
}

say "repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')), results in $RES"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || say "!!! nvidia-smi failed"
command -v nvcc >/dev/null && nvcc --version | tail -1

# ---- install: only when no CUDA torch is importable (the H200 image has one; no network there)
install() {
  $PY -c "import torch, triton, pytest; assert torch.cuda.is_available()" 2>/dev/null && { echo "CUDA torch present: install skipped"; return 0; }
  PMEDIT_TORCH_SPEC=${PMEDIT_TORCH_SPEC:-torch} bash scripts/setup.sh --test
  $PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU (a CPU wheel?)'"
}
export -f install
stage install 150 300 bash -c install
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

# ---- build both CUDA extensions (CPU-bound) and the resource report, while Triton runs on the GPU
build() {
  PMKERNELS_VERBOSE_BUILD=1 $PY - <<'EOF'
import sys
from pmkernels import batched_solve_cuda, covariance_cuda
bad = [m.__name__ for m in (covariance_cuda, batched_solve_cuda) if m._ext() is None]
print("built:", "none" if bad else "both", bad or "")
sys.exit(1 if bad else 0)
EOF
}
export -f build
( stage build 240 150 bash -c build > "$RES/build.log" 2>&1 ) & BUILD=$!
( stage resources 200 150 $PY scripts/gpu_check.py resources --json "$RES/resources.json" > "$RES/resources.md" 2>&1 ) & RESRC=$!

stage triton-correctness 120 200 $PY scripts/gpu_check.py correctness "$RES/checks.jsonl" --backends triton,torch,solve
say "waiting for the CUDA build"; wait $BUILD; tail -3 "$RES/build.log"

pytest_cuda() {
  $PY -m pytest -q -p no:cacheprovider -m cuda -rs --junitxml="$RES/pytest_cuda.xml" \
    tests/test_covariance.py tests/test_batched_solve.py; local rc=$?
  $PY scripts/gpu_check.py junit "$RES/pytest_cuda.xml" || rc=1
  return $rc
}
export -f pytest_cuda
stage pytest-cuda 120 150 bash -c pytest_cuda
stage cuda-correctness 90 120 $PY scripts/gpu_check.py correctness "$RES/checks.jsonl" --backends cuda,solve
wait $RESRC

TL=$(( DEADLINE - $(date +%s) - 15 )); (( TL > 220 )) && TL=220
export GPU_CHECK_TIMING_BUDGET=$(( TL > 30 ? TL - 20 : 10 ))
stage timing "$TL" 10 $PY scripts/gpu_check.py timing "$RES/timing.json"

$PY scripts/gpu_check.py report "$RES"; RC=$?
say "done in $(( $(date +%s) - T0 ))s; results in $RES"
exit $RC
