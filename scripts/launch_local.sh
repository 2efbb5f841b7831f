#!/usr/bin/env bash
# Runs one t5train command as N processes on this machine, each pretending to be a host
# with D CPU devices, joined by jax.distributed on 127.0.0.1 (gloo collectives).
# For trying multi-host layouts and for the tests; real clusters use launch_tpu_pod.sh or
# launch_slurm.sh.
#
#   scripts/launch_local.sh 2 2 .venv/bin/python -m t5train.train \
#       --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/runs/pretrain.gin \
#       --gin_file=gin/tasks/demo.gin --gin.MODEL_DIR="'/tmp/two_hosts'" --gin.TRAIN_STEPS=20
#
# Output lines are prefixed with the process index. If one process fails, the others are
# stopped and the script exits with the first failing status. PORT picks the coordinator port
# (default: a free one).
set -euo pipefail
set -m  # each process gets its own process group, so it can be stopped with its children

if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes=$1
devices_per_process=$2
shift 2
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    set -o pipefail
    JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=${devices_per_process} ${XLA_FLAGS:-}" \
      "$@" --multiprocess --coordinator_address="127.0.0.1:${port}" \
      --process_count="${num_processes}" --process_index="${i}" 2>&1 | sed -u "s/^/[process ${i}] /"
  ) &
  pids+=("$!")
done

status=0
for ((k = 0; k < num_processes; k++)); do
  if wait -n; then
    continue
  else
    code=$?
    if [[ $status -eq 0 ]]; then
      status=$code
      stop_all
    fi
  fi
done
exit "$status"
