#!/usr/bin/env bash
# Two processes on this machine (one CPU device each, gloo), the tiny model: steps per second
# with the stop check every step (an all-gather per step) and every 10 steps (the default).
#   scripts/bench_stop_check.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-600}
for period in 1 10 1 10; do
  dir=$(mktemp -d)
  rate=$(scripts/launch_local.sh 2 1 .venv/bin/python -m t5train.train \
      --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/runs/pretrain.gin \
      --gin_file=gin/tasks/demo.gin --gin.MODEL_DIR="'$dir'" --gin.TRAIN_STEPS="$steps" \
      --gin.BATCH_SIZE=8 --gin.EVAL_PERIOD=0 --gin.CHECKPOINT_PERIOD=None \
      --gin.SUMMARY_PERIOD=100000 --gin.train_script.train.stop_check_period="$period" \
      --gin.train_script.train.log_every_secs=5 2>&1 |
    grep -o "step $steps/$steps .*" | grep -o 'steps/s [0-9.]*' | tail -1)
  echo "stop_check_period=$period: $rate (the last progress window, after compilation)"
  rm -rf "$dir"
done
