#!/usr/bin/env bash
# Runs the same t5train command on every worker of a Cloud TPU VM pod slice. JAX detects the
# pod itself (coordinator, process count and index), so --multiprocess needs no other flags.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b scripts/launch_tpu_pod.sh t5train.train \
#       --gin_file=gin/models/t5_1_1/base.gin --gin_file=gin/runs/pretrain.gin \
#       --gin_file=gin/tasks/my_task.gin --gin.MODEL_DIR="'gs://my-bucket/runs/base'"
#
# Every worker must have the repository at REPO_DIR (default: ~/t5train) with `make install`
# done, and MODEL_DIR must be a path all workers share (a GCS bucket). Set PROJECT to name a
# project other than gcloud's default. The command's output of every worker streams back here.
set -euo pipefail

if [[ $# -lt 1 || -z "${TPU_NAME:-}" || -z "${ZONE:-}" ]]; then
  echo "usage: TPU_NAME=... ZONE=... [PROJECT=...] [REPO_DIR=...] $0 MODULE [ARGS...]" >&2
  echo "  MODULE is t5train.train, t5train.infer or t5train.eval" >&2
  exit 2
fi
module=$1
shift
repo_dir=${REPO_DIR:-'~/t5train'}
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="${PROJECT}")

# Quote every argument once for the remote shell.
remote_args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${project_flag[@]}" --worker=all \
  --command="cd ${repo_dir} && .venv/bin/python -m ${module} --multiprocess${remote_args}"
