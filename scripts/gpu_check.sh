#!/usr/bin/env bash
# One prepared GPU check: versions, correctness tests that need no TensorFlow, then the
# training benchmark (t5train and transformers side by side). Results land in $OUT.
#
#   carry .gpu_wheels (made by: pip download --no-deps -d .gpu_wheels clu==0.0.12 \
#     ml-collections wrapt etils==1.15.0 pytest==9.2.0 pluggy iniconfig gin-config==0.5.0)
set -uo pipefail
OUT=${OUT:-/tmp/t5train_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

echo "== wheels the image lacks (unpacked onto PYTHONPATH; the image's Python is externally managed)"
mkdir -p /tmp/t5train_wheels
for pair in clu:clu ml_collections:ml_collections wrapt:wrapt etils:etils pytest:pytest \
            pluggy:pluggy iniconfig:iniconfig gin:gin_config; do
  module=${pair%%:*}; wheel=${pair##*:}
  if ! python -c "import $module" 2>/dev/null; then
    echo "adding $wheel"; python -m zipfile -e .gpu_wheels/${wheel}-*.whl /tmp/t5train_wheels
  fi
done
export PYTHONPATH=$PWD:/tmp/t5train_wheels
# Several JAX processes run one after another; do not let one hold 75% of the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import clu.metrics, pytest; print('clu and pytest import')"

echo "== correctness (float32, full-precision matmuls)"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python -m pytest -q -p no:cacheprovider \
  tests/test_network_vs_transformers.py tests/test_decoding.py tests/test_layer_options.py \
  tests/test_losses.py 2>&1 | tail -15

BENCH=(python -m benchmarks.bench --workloads=train --dtype=bfloat16 --batch_size=64
       --lengths=512,128 --steps=5 --train_rounds=1)
QUIET="^I0000\|^W0000\|^E0000\|WARNING: All"
echo "== benchmark: bfloat16, batch 64, lengths 512/128, next to transformers"
timeout 180 "${BENCH[@]}" --sizes=small,base --peer=transformers \
  --out="$OUT/bench_gpu_bf16.json" 2>&1 | grep -v "$QUIET"
echo "== base with cuDNN fused attention"
timeout 75 "${BENCH[@]}" --sizes=base --peer=none --attention_implementation=cudnn \
  --out="$OUT/bench_gpu_bf16_cudnn.json" 2>&1 | grep -v "$QUIET"
echo "== base with cuDNN attention, scanned layers and dots_saveable rematerialisation"
timeout 75 "${BENCH[@]}" --sizes=base --peer=none --attention_implementation=cudnn \
  --scan_layers --remat_policy=dots_saveable --out="$OUT/bench_gpu_bf16_scan.json" 2>&1 | \
  grep -v "$QUIET"
echo "== the train step updates parameters in place (no copy of them) on this device too"
timeout 45 python -m pytest -q -p no:cacheprovider tests/test_training.py -k in_place 2>&1 | \
  tail -5
