#!/usr/bin/env bash
# The one accelerator check (about 8 minutes on one H100/H200, most of it compilation): apd's real
# bf16 training step for unet-60m, unet-620m (64x64x3), dit-b/2 and dit-xl/2 (32x32x4), each in
# the variants of `gpu_mfu.AUTO` (precision policy x remat policy): step time, MFU against the
# datasheet peak and against a measured bf16 matmul, compiled and peak memory, and time by kernel
# family from a profile of each row. Needs a Python with a CUDA jax, flax, optax and
# ml_collections (apd's training step needs nothing else; e.g.
# `pip install -e . "jax[cuda12]==0.10.2"`); set PYTHON to use a particular interpreter.
# Output: a table on stdout; gpu_mfu.json (written after every row) and the traces in $OUT (or .).
# Without a GPU, `python benchmarks/gpu_mfu.py --tiny --profile` runs the same check on tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if ! "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  echo "error: '$PYTHON' has no CUDA-enabled jax; install apd and jax[cuda12]==0.10.2 first" >&2
  exit 1
fi
timeout 480 "$PYTHON" benchmarks/gpu_mfu.py --steps=10 --variants=auto --profile \
  --trace-dir="${OUT:-.}" --out="${OUT:-.}/gpu_mfu.json"
