#!/usr/bin/env bash
# The test command: create or reuse a virtual environment, install apd with its test extras,
# check formatting and lint, then run the test suite on 8 fake CPU devices.
#
#   bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${APD_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    # Debian/Ubuntu ship venv separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -q && apt-get install -y -q python3-venv
    else
      echo "error: '$PYTHON -m venv' failed; install python3-venv (sudo apt-get install python3-venv)" >&2
      exit 1
    fi
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi

# Reinstall only when the requirements changed.
stamp="$VENV/.apd-install-stamp"
want="$(cat setup.py | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  "$VENV/bin/python" -c "import apd, jax, flax, optax, orbax.checkpoint, grain, scipy, pytest"
  echo "$want" > "$stamp"
fi

echo "== ruff format --check && ruff check"
"$VENV/bin/ruff" format --check .
"$VENV/bin/ruff" check .

echo "== pytest"
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_NUMPY_RANK_PROMOTION=raise
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=3
exec "$VENV/bin/python" -m pytest -n "${APD_TEST_WORKERS:-2}" --durations=15 "$@"
