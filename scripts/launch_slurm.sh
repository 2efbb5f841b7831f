#!/usr/bin/env bash
# A SLURM batch script for a GPU cluster: one task per node, each task sees all of its node's
# GPUs, and JAX reads the coordinator, process count and index from SLURM's environment.
#
#   sbatch --nodes=4 --gpus-per-node=8 scripts/launch_slurm.sh t5train.train \
#       --gin_file=gin/models/t5_1_1/xl.gin --gin_file=gin/runs/pretrain.gin \
#       --gin_file=gin/tasks/my_task.gin --gin.MODEL_DIR="'/shared/runs/xl'" \
#       --gin.partitioning.PjitPartitioner.num_partitions=8
#
# Run it from the repository (after `make install`) on a file system every node shares;
# MODEL_DIR must be shared too. Options below are defaults that sbatch's command line overrides.
#SBATCH --job-name=t5train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=t5train-%j.log
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: sbatch [OPTIONS] $0 MODULE [ARGS...]   (MODULE: t5train.train, .infer or .eval)" >&2
  exit 2
fi
module=$1
shift
repo_dir=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}

# --kill-on-bad-exit stops every task when one fails instead of leaving the rest waiting.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --chdir="${repo_dir}" \
  .venv/bin/python -m "${module}" --multiprocess "$@"
