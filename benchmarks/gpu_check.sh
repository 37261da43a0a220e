#!/usr/bin/env bash
# One short GPU check (about 6 minutes, most of it compilation): bf16 training-step MFU of the 60M
# U-Net and DiT-B/2 on one H100/H200, the U-Net also with float32 convolution outputs and the DiT
# also with bf16 activations. Needs a Python with a CUDA jax, flax, optax and ml_collections
# (apd's training step needs nothing else; e.g. `pip install -e . "jax[cuda12]==0.10.2"`); set
# PYTHON to use a particular interpreter.
# Output: a table on stdout; gpu_mfu.json and one profiler trace per model in $OUT (or .).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if ! "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  echo "error: '$PYTHON' has no CUDA-enabled jax; install apd and jax[cuda12]==0.10.2 first" >&2
  exit 1
fi
timeout 400 "$PYTHON" benchmarks/gpu_mfu.py --steps=20 --scale=4 \
  --variants=default,f32-conv-output,bf16-activations --trace-dir="${OUT:-.}" --out="${OUT:-.}/gpu_mfu.json"
