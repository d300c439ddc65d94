#!/usr/bin/env bash
# Run N processes of the trainer on this machine, as a pod would run one per host.
#   launch/local_multiprocess.sh 2 --config=configs/demo.py --workdir=/tmp/vtp_mp
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 2) and CPU collectives (gloo);
# process 0 hosts the coordinator on PORT (default 12355). Logs: WORKDIR/logs/process_<i>.log.
set -euo pipefail
n="${1:?usage: $0 NUM_PROCESSES --config=... --workdir=DIR [flags]}"; shift
workdir=$(printf '%s\n' "$@" | sed -n 's/^--workdir=//p' | tail -1)
: "${workdir:?--workdir=DIR is required}"
port="${PORT:-12355}"
mkdir -p "$workdir/logs"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}" \
    python -m vtp_jax.main "$@" --coordinator="127.0.0.1:$port" --num_processes="$n" --process_id="$i" \
    >"$workdir/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 5 "$workdir/logs/process_0.log"
exit "$status"
