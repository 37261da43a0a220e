#!/usr/bin/env bash
# The main job on the embedded default: Fashion-MNIST, a small U-Net, about 15 minutes of training
# on 2 CPU cores, then samples from every kind of plan, the evaluation and a report.
#
#   bash launch/quickstart.sh [--config.KEY=VALUE ...]
#
# Installs what it needs (the Debian package dataset-fashion-mnist, a virtual environment in .venv),
# trains into $APD_WORKDIR (default runs/fashion_mnist; relaunching resumes), samples every plan
# into $APD_WORKDIR/report/, evaluates (FID_FMNIST with apd's feature network, trained once into
# ~/.cache/apd; inpainting protocol; bits/dim) and writes $APD_WORKDIR/eval/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${APD_WORKDIR:-runs/fashion_mnist}"
DATA=/usr/share/datasets/fashion-mnist

if [ ! -d "$DATA" ]; then
  echo "== installing the Debian package dataset-fashion-mnist"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && apt-get install -y -q dataset-fashion-mnist
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist
  else
    echo "error: $DATA is missing; install the Debian package dataset-fashion-mnist" >&2
    exit 1
  fi
fi

source launch/env.sh ""  # no extras (an explicit argument, or ours would leak in)
PY="$VENV/bin/python"
export TF_CPP_MIN_LOG_LEVEL=3
# Two host devices with the batch split over them use both cores best (WORKSPACE.md).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false"

echo "== training (progress, steps/s and ETA below; Ctrl-C and rerun to resume)"
"$PY" -m apd.train --config=experiments/fashion_mnist.py --workdir="$WORKDIR" "$@"

REPORT="$WORKDIR/report"
mkdir -p "$REPORT"
echo "== level-sampler diagnostics"
"$PY" -m apd.levels --sampler=all --grid=28 --n=20000 --out="$REPORT/levels"

sample() {  # name, then apd.sample flags
  local name=$1; shift
  echo "== samples: $name"
  rm -rf "${REPORT:?}/$name"
  "$PY" -m apd.sample --workdir="$WORKDIR" --num=32 --steps=100 --out="$REPORT/$name" "$@"
}
sample synchronous --plan=synchronous
sample inpaint_half --plan=inpaint --mask=half
sample inpaint_half_guided --plan=inpaint --mask=half --input_guidance=1.5
sample edit_linear --plan=edit --strength=linear
sample autoregressive --plan=autoregressive --patches=4 --steps_per_group=16
sample repaint_half --plan=repaint --mask=half

echo "== uncertainty head and adaptive sampling"
"$PY" -m apd.train_uncertainty --workdir="$WORKDIR"
sample adaptive --plan=adaptive

echo "== evaluation: FID_FMNIST, inpainting on every mask family (with and without input guidance), bits/dim"
"$PY" -m apd.evaluate --config=experiments/fashion_mnist.py --workdir="$WORKDIR"

echo "done: the report is $WORKDIR/eval/report.md (pictures under $REPORT and $WORKDIR/eval)"
