#!/usr/bin/env bash
# Cloud TPU pod slice: create, install, run on every worker, tear down.
#
#   bash launch/tpu_pod.sh create   NAME ZONE ACCELERATOR   (e.g. v5p-64; runtime v2-alpha-tpuv5)
#   bash launch/tpu_pod.sh install  NAME ZONE               (copies this checkout, installs apd)
#   bash launch/tpu_pod.sh run      NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   bash launch/tpu_pod.sh delete   NAME ZONE
#
# WORKDIR must be a gs:// path or a shared filesystem: every worker writes its shards of each
# checkpoint there. The workers find each other by themselves (jax.distributed on TPU). A
# preempted (spot) slice: recreate it and `run` again with the same WORKDIR; training resumes.
set -euo pipefail
cmd=${1:?create|install|run|delete}; name=${2:?tpu name}; zone=${3:?zone}; shift 3
RUNTIME=${TPU_RUNTIME:-v2-alpha-tpuv5}
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }
case "$cmd" in
  create)
    accel=${1:?accelerator type, e.g. v5p-64}
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" \
      --version="$RUNTIME" ${TPU_SPOT:+--spot}
    ;;
  install)
    here=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$here" --exclude=.venv --exclude=.git -czf /tmp/apd.tgz .
    gcloud compute tpus tpu-vm scp /tmp/apd.tgz "$name":~/apd.tgz --zone="$zone" --worker=all
    ssh_all 'mkdir -p ~/apd && tar -C ~/apd -xzf ~/apd.tgz && cd ~/apd &&
      python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/pip install -q "jax[tpu]==0.10.2"'
    ;;
  run)
    config=${1:?config}; workdir=${2:?workdir}; shift 2
    ssh_all "cd ~/apd && nohup .venv/bin/python -m apd.train --config='$config' \
      --workdir='$workdir' $* > ~/apd_train.log 2>&1 &"
    echo "started; follow with: gcloud compute tpus tpu-vm ssh $name --zone=$zone --worker=0 --command='tail -f ~/apd_train.log'"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
  *) echo "unknown command $cmd (create|install|run|delete)" >&2; exit 2;;
esac
