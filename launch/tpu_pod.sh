#!/usr/bin/env bash
# Cloud TPU launcher: one slice (a TPU VM) or several (multi-slice, one queued resource), the same
# command on every host of every slice; jax.distributed.initialize() reads the pod from the TPU
# metadata. Walk-through and prerequisites: docs/cluster.md.
#
#   export TPU_NAME=vtp-l ZONE=us-east5-a ACCELERATOR=v5p-128 PROJECT=my-project
#   export WORKDIR=gs://my-bucket/vtp_l REPO=https://github.com/me/vtp-jax.git
#   launch/tpu_pod.sh create          # the slice(s); returns once every node is READY
#   launch/tpu_pod.sh setup           # every host: uv, a Python 3.11 venv, the clone, pip install
#   launch/tpu_pod.sh run --config=configs/vtp_l.py [--config.a.b=v ...]   # compile plan, then train
#   launch/tpu_pod.sh plan --config=configs/vtp_l.py [...]                 # the compile plan alone
#   launch/tpu_pod.sh status | wait | logs | stop | delete
#
# Variables (environment; "create", "run": the commands that need them):
#   TPU_NAME       required. The TPU VM; with SLICES > 1 the prefix of its nodes TPU_NAME-0 ...
#                  TPU_NAME-<SLICES-1>. A queued resource is called TPU_NAME-qr.
#   ZONE           required. A zone with quota for ACCELERATOR, in the region of WORKDIR's bucket.
#   PROJECT        The Google Cloud project (default: gcloud's configured project).
#   ACCELERATOR    create, plan, run. Cloud accelerator type of ONE slice: v4-N, v5litepod-N (v5e),
#                  v5p-N or v6e-N (v4 / v5p count TensorCores, 2 per chip; v5e / v6e count chips).
#   SLICES         1. More than 1: SLICES slices of ACCELERATOR as one queued resource
#                  (--node-count), joined over the data-centre network (train.dcn_mesh).
#   QUEUED         0. 1: a single slice as a queued resource too (waits in the queue for capacity).
#   SPOT           0. 1: spot capacity (preemptible: SIGTERM saves a checkpoint; `run` again resumes).
#   RUNTIME        TPU software version; default by ACCELERATOR: v4 tpu-ubuntu2204-base, v5e
#                  v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e (all Ubuntu 22.04,
#                  whose python3 is 3.10: too old for jax 0.10, hence the venv below).
#   READY_TIMEOUT  3600. Seconds `create` and `wait` wait for READY (a queued resource: ACTIVE).
#   POLL           30. Seconds between two state checks.
#   REPO           setup. Git URL of this repository that every host can clone.
#   REF            setup. Branch, tag or commit every host checks out (default: REPO's HEAD).
#   PYTHON         3.11. Python of the hosts' venv, installed by uv (its own build, not the image's).
#   UV_VERSION     0.13.8. uv, installed with the image's pip into ~/.local/bin of every host.
#   VENV           vtp-venv. The venv, relative to the home folder of every host; every remote
#                  command runs its bin/python.
#   SRC            vtp-jax. The clone, relative to the home folder of every host.
#   WORKDIR        run. The run's folder, gs://BUCKET/...: checkpoints, TensorBoard, export/.
#   COMPILE_FOR    The topology of the compile plan (default: ACCELERATOR, v5litepod-N as v5e-N).
#   PLAN_DIR       WORKDIR/compile_plan. Where the plan writes compiled.json.
#   SKIP_PLAN      0. 1: `run` starts without the compile plan (a run that does not fit then
#                  fails on the pod, after the hosts have loaded everything).
#   FOLLOW         1. 0: `run` returns once the hosts have started instead of following the log.
#
# `run` first compiles the job for the pod's topology on host 0 of slice 0, on its CPU
# (JAX_PLATFORMS=cpu; `--config.train.compile_for`, docs/cluster.md): the same code and jax as
# the run, and no TPU is touched. A plan that exits non-zero (the step does not fit the chips'
# memory, or the config is wrong) stops `run` before any host starts training.
# Every argument reaches the hosts' command unchanged: each is quoted once (printf %q) for the
# hosts' login shell (bash), so parentheses, quotes, globs and spaces survive.
set -euo pipefail
: "${TPU_NAME:?TPU_NAME is required (docs/cluster.md)}" "${ZONE:?ZONE is required (docs/cluster.md)}"
cmd="${1:?usage: $0 create|setup|plan|run|status|wait|logs|stop|delete [--config=... flags]}"
shift
SLICES="${SLICES:-1}" QUEUED="${QUEUED:-0}" SPOT="${SPOT:-0}" READY_TIMEOUT="${READY_TIMEOUT:-3600}"
POLL="${POLL:-30}" PYTHON="${PYTHON:-3.11}" UV_VERSION="${UV_VERSION:-0.13.8}" VENV="${VENV:-vtp-venv}"
SRC="${SRC:-vtp-jax}" SKIP_PLAN="${SKIP_PLAN:-0}" FOLLOW="${FOLLOW:-1}"
qr="$TPU_NAME-qr"
project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project="$PROJECT"); fi
where=(--zone="$ZONE" "${project[@]}")

die() { echo "tpu_pod.sh: $*" >&2; exit 1; }
queued() { [[ "$SLICES" != 1 || "$QUEUED" == 1 ]]; }
nodes=("$TPU_NAME")  # the slices' TPU VMs
if [[ "$SLICES" != 1 ]]; then nodes=(); for ((i = 0; i < SLICES; i++)); do nodes+=("$TPU_NAME-$i"); done; fi
q() { printf '%q' "$1"; }  # one word, quoted once for the hosts' bash
# Every remote script starts from the host's home, with the venv and the clone as absolute paths.
remote_prelude="set -e; venv=\$HOME/$(q "$VENV"); src=\$HOME/$(q "$SRC")"
ssh_node() {  # NODE WORKER SCRIPT
  gcloud compute tpus tpu-vm ssh "$1" "${where[@]}" --worker="$2" --command="$remote_prelude; $3"
}
ssh_all() { local node; for node in "${nodes[@]}"; do ssh_node "$node" all "$1"; done; }

runtime_for() {
  case "$1" in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
set_plan() {  # topo: the compile plan's name of one slice; plan_dir: where the plan writes
  if [[ -z "${COMPILE_FOR:-}" ]]; then
    : "${ACCELERATOR:?ACCELERATOR (or COMPILE_FOR) names the topology of the compile plan; SKIP_PLAN=1 skips the plan}"
  fi
  topo="${COMPILE_FOR:-$ACCELERATOR}"
  if [[ "$topo" == v5litepod-* ]]; then topo="v5e-${topo#v5litepod-}"; fi
  plan_dir="${PLAN_DIR:-${WORKDIR:?WORKDIR (or PLAN_DIR) is required for the compile plan}/compile_plan}"
}

state_of() {  # the queued resource's state, or the node's
  if [[ "$1" == "$qr" ]]; then
    gcloud compute tpus queued-resources describe "$qr" "${where[@]}" --format='value(state.state)'
  else
    gcloud compute tpus tpu-vm describe "$1" "${where[@]}" --format='value(state)'
  fi
}
wait_for() {  # RESOURCE WANTED: poll until it is WANTED; fail on a dead state or after READY_TIMEOUT
  local state deadline=$((SECONDS + READY_TIMEOUT))
  while :; do
    state=$(state_of "$1") || state=UNKNOWN
    if [[ "$state" == "$2" ]]; then echo "$1: $state"; return 0; fi
    case "$state" in
      FAILED | SUSPENDED | SUSPENDING | PREEMPTED | TERMINATED | STOPPED | DELETING)
        die "$1 is $state, not $2: delete it (launch/tpu_pod.sh delete) and create again" ;;
    esac
    if ((SECONDS >= deadline)); then
      die "$1 is still ${state:-UNKNOWN} after ${READY_TIMEOUT} s; launch/tpu_pod.sh wait keeps waiting"
    fi
    echo "$1: ${state:-UNKNOWN}, waiting for $2"
    sleep "$POLL"
  done
}
wait_ready() {
  local node
  if queued; then wait_for "$qr" ACTIVE; fi
  for node in "${nodes[@]}"; do wait_for "$node" READY; done
}

plan() {  # the compile plan on host 0 of slice 0 (after set_plan): exit 0 when the job fits the chips
  local slices=()
  if [[ "$SLICES" != 1 ]]; then slices=("--config.train.compile_slices=$SLICES"); fi
  local args
  args=$(printf ' %q' -m vtp_jax.main --nodistributed "$@" "--config.train.compile_for=$topo" "${slices[@]}" \
    "--workdir=$plan_dir")
  echo "compile plan: $SLICES x $topo, on ${nodes[0]} worker 0 (its CPU)"
  ssh_node "${nodes[0]}" 0 "cd \"\$src\"; JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 \"\$venv/bin/python\"$args"
}

case "$cmd" in
  create)
    : "${ACCELERATOR:?ACCELERATOR is required for create (e.g. v5p-128)}"
    runtime="${RUNTIME:-$(runtime_for "$ACCELERATOR")}"
    spot=()
    if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
    if [[ "$SLICES" != 1 ]]; then
      gcloud compute tpus queued-resources create "$qr" "${where[@]}" --accelerator-type="$ACCELERATOR" \
        --runtime-version="$runtime" --node-count="$SLICES" --node-prefix="$TPU_NAME" "${spot[@]}"
    elif [[ "$QUEUED" == 1 ]]; then
      gcloud compute tpus queued-resources create "$qr" "${where[@]}" --accelerator-type="$ACCELERATOR" \
        --runtime-version="$runtime" --node-id="$TPU_NAME" "${spot[@]}"
    else
      gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
        --version="$runtime" "${spot[@]}"
    fi
    wait_ready ;;
  wait) wait_ready ;;
  status)
    if queued; then echo "$qr: $(state_of "$qr")"; fi
    for node in "${nodes[@]}"; do echo "$node: $(state_of "$node")"; done ;;
  setup)
    : "${REPO:?REPO (a git URL every host can clone) is required for setup}"
    ssh_all "uv=\$HOME/.local/bin/uv
if [ ! -x \"\$uv\" ] || [ \"\$(\"\$uv\" --version | cut -d' ' -f2)\" != $(q "$UV_VERSION") ]; then
  python3 -m pip install --user --quiet $(q "uv==$UV_VERSION")
fi
\"\$uv\" venv --quiet --allow-existing --python $(q "$PYTHON") \"\$venv\"
if [ ! -d \"\$src/.git\" ]; then git clone --quiet $(q "$REPO") \"\$src\"; fi
git -C \"\$src\" fetch --quiet origin $(q "${REF:-HEAD}")
git -C \"\$src\" checkout --quiet --detach FETCH_HEAD
\"\$uv\" pip install --quiet --python \"\$venv/bin/python\" -e \"\$src[train,hub,tpu]\"
\"\$venv/bin/python\" -c 'import sys, jax, vtp_jax; assert sys.version_info >= (3, 11), sys.version; print(sys.version.split()[0], \"jax\", jax.__version__)'
echo \"\$(hostname): \$(git -C \"\$src\" rev-parse --short HEAD)\"" ;;
  plan) set_plan; plan "$@" ;;
  run)
    : "${WORKDIR:?WORKDIR (gs://BUCKET/...) is required for run}"
    if [[ "$SKIP_PLAN" == 1 ]]; then
      echo "SKIP_PLAN=1: starting without the compile plan" >&2
    else
      set_plan
      plan "$@" || die "the compile plan did not pass (its output is above): the run does not fit $SLICES x $topo, or the config is wrong; nothing was started (SKIP_PLAN=1 starts anyway)"
    fi
    args=$(printf ' %q' -m vtp_jax.main --distributed "--workdir=$WORKDIR" "$@")
    ssh_all "cd \"\$src\"; nohup \"\$venv/bin/python\"$args > \"\$HOME/vtp.log\" 2>&1 < /dev/null & echo \$! > \"\$HOME/vtp.pid\""
    if [[ "$FOLLOW" == 1 ]]; then exec bash "$0" logs; fi ;;
  logs) ssh_node "${nodes[0]}" 0 "tail -n +1 -f \"\$HOME/vtp.log\"" ;;
  stop)  # SIGTERM: a checkpoint at the next step boundary, then exit 0
    ssh_all "if [ -f \"\$HOME/vtp.pid\" ]; then kill -TERM \"\$(cat \"\$HOME/vtp.pid\")\" 2>/dev/null || true; fi" ;;
  delete)
    if queued; then
      gcloud compute tpus queued-resources delete "$qr" "${where[@]}" --force --quiet
    else
      gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
    fi ;;
  *) die "unknown command $cmd: expected create, setup, plan, run, status, wait, logs, stop or delete" ;;
esac
