#!/usr/bin/env bash
# Runs N local processes joined by jax.distributed (CPU, fake devices), e.g. to rehearse a pod run.
#
#   bash launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- \
#       --config=experiments/fashion_mnist.py:smoke --workdir=/tmp/mp
#
# Logs go to WORKDIR/process_I.log; the script exits non-zero if any process fails.
set -euo pipefail
cd "$(dirname "$0")/.."
num=${1:?number of processes}; devices=${2:?devices per process}; shift 2
[ "${1:-}" = "--" ] && shift
PYTHON="${PYTHON:-.venv/bin/python}"
workdir=""
for a in "$@"; do case "$a" in --workdir=*) workdir="${a#--workdir=}";; esac; done
[ -n "$workdir" ] || { echo "error: pass --workdir=DIR" >&2; exit 2; }
mkdir -p "$workdir"
port=$(( 20000 + RANDOM % 20000 ))
pids=()
for ((i = 0; i < num; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    "$PYTHON" -m apd.train "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num" --process_id="$i" > "$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ $status = 0 ] || { echo "a process failed; see $workdir/process_*.log" >&2; tail -20 "$workdir"/process_*.log >&2; }
exit $status
