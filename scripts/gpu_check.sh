#!/usr/bin/env bash
# The prepared GPU check, in two parts of at most about 5 minutes each; results land in $OUT.
#
#   bash scripts/gpu_check.sh main     correctness (cuDNN attention with T5's bias in bfloat16
#                                      against float32 einsums; the fused paths at full matmul
#                                      precision), attention at lengths 512/2048/8192, T5 1.1
#                                      base, large and small training beside transformers eager
#   bash scripts/gpu_check.sh levers   base with one lever changed at a time, decoding beside
#                                      transformers, the network and loss tests
#
# The t5train rows scan their layers: with cuDNN attention in every layer, the unrolled base row
# (initialisation, compilation and 7 steps) did not finish within 130 s on an H200 (2026-12-04);
# the scanned model compiled its train step in 16 s.
#
# DEADLINE (seconds, default 330) bounds a part: a section starts only while enough time is
# left, and is stopped at its own limit, so one slow or failing section does not stop the rest.
# The image lacks clu, ml_collections and gin-config: carry .gpu_wheels, made by
#   pip download --no-deps -d .gpu_wheels clu==0.0.12 ml-collections==1.1.0 gin-config==0.5.0
set -uo pipefail
PART=${1:-main}
DEADLINE=${DEADLINE:-330}
OUT=${OUT:-/tmp/t5train_gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check_$PART.log") 2>&1
PY=${PY:-python3}

mkdir -p /tmp/t5train_wheels
for wheel in .gpu_wheels/*.whl; do
  $PY -m zipfile -e "$wheel" /tmp/t5train_wheels
done
export PYTHONPATH=$PWD:/tmp/t5train_wheels
export PYTHONUNBUFFERED=1
# Rows run one after another in their own processes: none may hold most of the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Shared by the rows of both parts while the machine stays up: XLA's GEMM autotuning results
# (and whole executables) are reused, so a program's compile time counts its own work only.
export JAX_COMPILATION_CACHE_DIR=/tmp/t5train_jax_cache
QUIET="^I0000\|^W0000\|^E0000\|WARNING: All\|^WARNING:absl"

# section NAME SECONDS COMMAND...: runs COMMAND with a limit of SECONDS (less if the part's
# deadline is nearer), or skips it when under 20 s would be left for it.
section() {
  local name=$1 need=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  local limit=$((need < left ? need : left))
  if ((limit < 20)); then
    echo "== $name: skipped, ${left}s left of the part's ${DEADLINE}s"
    return
  fi
  echo "== $name (limit ${limit}s, at ${SECONDS}s)"
  timeout -s KILL "$limit" "$@" 2>&1 | grep -v "$QUIET"
  echo "   ($name ended at ${SECONDS}s)"
}

BENCH=($PY -m benchmarks.bench --workloads=train --dtype=bfloat16 --lengths=512,114 --steps=5
       --train_rounds=1 --notebook_rows=false --noloop_breakdown --scan_layers)

if [[ $PART == main ]]; then
  echo "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader
  $PY -c "import sys, jax, flax, optax, torch, transformers; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"

  section "correctness: attention paths (float32, highest precision; cuDNN in bf16 against them)" 100 \
    env JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m pytest -q -p no:cacheprovider -rs \
    tests/test_attention_paths.py::test_cudnn_attention_with_the_bias_equals_float32_einsum_attention \
    "tests/test_layer_options.py::test_fused_attention_equals_the_einsum_attention[cudnn]" \
    tests/test_attention_paths.py

  section "attention layer, forward + backward, at 512/2048/8192" 80 \
    $PY -m benchmarks.attention --steps=5 --out="$OUT/attention.json"
fi

# cuDNN attention with T5's bias where it ran and agreed with the einsum path (main's attention
# rows, kept in /tmp while the machine stays up), else t5train's own; ATTN_IMPL=cudnn or none
# decides instead.
[[ -f $OUT/attention.json ]] && cp "$OUT/attention.json" /tmp/t5train_attention.json
ATTN=()
if [[ ${ATTN_IMPL:-auto} == cudnn ]]; then
  ATTN=(--attention_implementation=cudnn)
elif [[ ${ATTN_IMPL:-auto} == auto ]] && $PY - /tmp/t5train_attention.json 2>/dev/null <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))['rows']
ok = [r for r in rows if r['path'] == 'cudnn' and 'error' not in r
      and r.get('out_relative_error', 1) < 5e-2 and r.get('table_grad_relative_error', 1) < 5e-2]
sys.exit(0 if ok else 1)
EOF
then
  ATTN=(--attention_implementation=cudnn)
fi
echo "== t5train rows use: ${ATTN[*]:-the einsum attention (no cuDNN)}"

if [[ $PART == main ]]; then
  section "base: t5train beside transformers eager, batch 64" 100 \
    "${BENCH[@]}" "${ATTN[@]}" --sizes=base --batch_size=64 --peer=transformers \
    --row_timeout=60 --out="$OUT/bench_base.json"
  section "large: t5train beside transformers eager, batch 64 (128 does not fit)" 120 \
    "${BENCH[@]}" "${ATTN[@]}" --sizes=large --batch_size=64 --peer=transformers \
    --row_timeout=70 --out="$OUT/bench_large.json"
  section "small: t5train beside transformers eager, batch 64" 80 \
    "${BENCH[@]}" "${ATTN[@]}" --sizes=small --batch_size=64 --peer=transformers \
    --row_timeout=50 --out="$OUT/bench_small.json"
fi

if [[ $PART == levers ]]; then
  section "base lever: t5train's own attention (einsums) instead of cuDNN" 60 \
    "${BENCH[@]}" --sizes=base --batch_size=64 --peer=none --out="$OUT/lever_einsum.json"
  section "base lever: batch 128" 60 \
    "${BENCH[@]}" "${ATTN[@]}" --sizes=base --batch_size=128 --peer=none \
    --out="$OUT/lever_batch128.json"
  section "base lever: XLA's latency-hiding scheduler" 60 \
    env XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true \
    "${BENCH[@]}" "${ATTN[@]}" --sizes=base --batch_size=64 --peer=none \
    --out="$OUT/lever_lhs.json"
  section "decode: small, greedy and beam 4, batch 1 and 64, beside transformers" 240 \
    $PY -m benchmarks.bench --workloads=decode --dtype=bfloat16 --lengths=512,114 \
    --decode_sizes=small --decode_batch_sizes=1,64 --decode_methods=greedy,beam4 \
    --decode_repeats=2 --peer=transformers "${ATTN[@]}" --row_timeout=90 --out="$OUT/decode.json"
  section "network and loss tests, float32 at highest precision" 90 \
    env JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m pytest -q -p no:cacheprovider \
    tests/test_network.py tests/test_losses.py
fi
echo "== done at ${SECONDS}s"
