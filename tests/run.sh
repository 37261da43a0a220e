#!/usr/bin/env bash
# The test command: create or reuse a virtual environment, install apd with its test extras,
# check formatting and lint, then run the test suite on 8 fake CPU devices.
#
#   bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh test

echo "== ruff format --check && ruff check"
"$VENV/bin/ruff" format --check .
"$VENV/bin/ruff" check .

# The embedded datasets' Debian packages: Fashion-MNIST's IDX files and the clip art of
# apd.data.clipart (tests that read an installed package skip without it).
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ -d /usr/share/openclipart/png ] || missing+=(openclipart-png)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing the Debian packages ${missing[*]}"
  warning="warning: could not install ${missing[*]}; the tests that read them are skipped"
  if [ "$(id -u)" = 0 ]; then
    { apt-get update -q && apt-get install -y -q "${missing[@]}"; } || echo "$warning" >&2
  elif command -v sudo >/dev/null 2>&1; then
    { sudo -n apt-get update -q && sudo -n apt-get install -y -q "${missing[@]}"; } \
      || echo "$warning" >&2
  else
    echo "warning: ${missing[*]} not installed (no root or sudo); the tests that read them are skipped" >&2
  fi
fi

echo "== pytest"
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_NUMPY_RANK_PROMOTION=raise
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=3
exec "$VENV/bin/python" -m pytest -n "${APD_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
