#!/usr/bin/env bash
# One short GPU check (under 5 minutes): bf16 training-step MFU of the 60M U-Net and DiT-B/2 on a
# single H100/H200. Needs a Python environment with apd's requirements and a CUDA jax (e.g.
# `pip install -e . "jax[cuda12]==0.10.2"`); set PYTHON to use a particular interpreter.
# Output: a table on stdout and gpu_mfu.json in $OUT (or the current directory).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if ! "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  echo "error: '$PYTHON' has no CUDA-enabled jax; install apd and jax[cuda12]==0.10.2 first" >&2
  exit 1
fi
timeout 290 "$PYTHON" benchmarks/gpu_mfu.py --steps=20 --out="${OUT:-.}/gpu_mfu.json"
