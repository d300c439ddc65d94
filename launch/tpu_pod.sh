#!/usr/bin/env bash
# Cloud TPU pod launcher: the same command on every host; JAX detects the pod itself.
#
#   export TPU_NAME=vtp-l ZONE=us-central2-b ACCELERATOR=v4-256 PROJECT=my-project
#   export WORKDIR=gs://my-bucket/vtp_l REPO=https://github.com/me/vtp-jax.git
#   launch/tpu_pod.sh create            # a TPU VM slice (QUEUED=1: as a queued resource)
#   launch/tpu_pod.sh setup             # clone + pip install on every host
#   launch/tpu_pod.sh run --config=configs/vtp_l.py   # trains; logs stream back
#   launch/tpu_pod.sh logs | stop | delete
#
# Each host runs `python -m vtp_jax.main --distributed --config=... --workdir=$WORKDIR`:
# jax.distributed.initialize() with no arguments reads the slice from the TPU metadata (the
# documented start on TPU VMs; orbax's multi-host saves and the preemption sync need it), and
# every path, checkpoints and TensorBoard logs included, goes to $WORKDIR on GCS.
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}"
cmd="${1:?usage: $0 create|setup|run|logs|stop|delete [flags]}"; shift || true
gtpu=(gcloud compute tpus tpu-vm)
ssh_all() { "${gtpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all --command="$1"; }
case "$cmd" in
  create)
    : "${ACCELERATOR:?}"
    version="${RUNTIME:-tpu-ubuntu2204-base}"
    if [[ "${QUEUED:-0}" == 1 ]]; then
      gcloud compute tpus queued-resources create "$TPU_NAME-qr" --node-id="$TPU_NAME" --zone="$ZONE" \
        ${PROJECT:+--project="$PROJECT"} --accelerator-type="$ACCELERATOR" --runtime-version="$version" \
        ${SPOT:+--spot}
    else
      "${gtpu[@]}" create "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
        --accelerator-type="$ACCELERATOR" --version="$version" ${SPOT:+--spot}
    fi ;;
  setup)
    : "${REPO:?}"
    ssh_all "git clone $REPO vtp-jax 2>/dev/null || git -C vtp-jax pull; cd vtp-jax && pip install -U 'jax[tpu]' -e '.[train,hub]'" ;;
  run)
    : "${WORKDIR:?}"
    ssh_all "cd vtp-jax && nohup python -m vtp_jax.main --distributed --workdir=$WORKDIR $* > ~/vtp.log 2>&1 &"
    "$0" logs ;;
  logs) "${gtpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=0 --command="tail -f ~/vtp.log" ;;
  stop) ssh_all "pkill -TERM -f vtp_jax.main || true" ;;  # SIGTERM: checkpoint, then exit 0
  delete)
    if [[ "${QUEUED:-0}" == 1 ]]; then
      gcloud compute tpus queued-resources delete "$TPU_NAME-qr" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --force --quiet
    else
      "${gtpu[@]}" delete "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --quiet
    fi ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
