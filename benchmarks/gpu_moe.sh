#!/usr/bin/env bash
# Mixture of experts on the GPU machine (issue 20), checks then measurements, in ONE command bounded
# by MOE_BUDGET seconds (default 450, FlashInfer's and Triton's JIT compiles included):
#   1. tests/gpu/test_moe_gpu.py (at most 35% of the budget): the Triton MoE kernels vs the float32
#      reference at qwen3-30b-a3b's expert shapes, CUDA-graph replay, engine accuracy, TP 2 / EP 2 tokens
#   2. benchmarks/gpu_moe.py with the rest: the fused layer checked again (nothing measured unless
#      it matches), the layer at 1 / 64 / 3,500 tokens with a tile sweep, qwen3-30b-a3b decode (batch
#      1, 64; 2k context) and prefill (3,500 tokens) vs their floors, TP 1 / TP 2 / EP 2 on two GPUs
#   3. the table (benchmarks/gpu_moe.py --report); logs and moe.json in $OUT
# Usage (GPU machine, nvidia-h200-x2; needs .whl/ from ../shared/gpu/fetch-wheels.sh, optionally .ficache.tgz.part-*):
#   OUT=$OUT bash benchmarks/gpu_moe.sh
#   OUT=$OUT bash benchmarks/gpu_moe.sh flashinfer   # FlashInfer's cutlass_fused_moe vs ours (compiles its SM90 module; own command)
#   bash benchmarks/gpu_moe.sh --cpu-smoke           # CPU: the same scripts (a tiny model, gloo; GPU tests skip)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-moe}; mkdir -p "$OUT"
BUDGET=${MOE_BUDGET:-450}
start=$SECONDS
smoke=0; [ "${1:-}" = "--cpu-smoke" ] && { smoke=1; shift; }
. "$(dirname "$0")/gpu_env.sh"
extra=(); [ $smoke = 1 ] && extra=(--cpu-smoke --layers 2 --tp-layers 2)
if [ "${1:-}" = "flashinfer" ]; then
  timeout -k 20 $((BUDGET + 60)) $py benchmarks/gpu_moe.py --out "$OUT" --budget "$BUDGET" check kernel flashinfer 2>&1 \
    | tee "$OUT/moe_flashinfer.log" | grep -E "^\[[0-9:]+\]|Error" | tail -30
  pack_cache
  $py benchmarks/gpu_moe.py --out "$OUT" --report
  exit 0
fi
# 1. tests (-v: each outcome is logged as it finishes)
timeout -k 20 -s INT $((BUDGET * 35 / 100)) $py -m pytest -v -p no:cacheprovider tests/gpu/test_moe_gpu.py 2>&1 \
  | tee "$OUT/moe_tests.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" | tail -16
# 2. measurements with what is left (half a minute kept for packing the cache and the table)
left=$((BUDGET - (SECONDS - start) - 30))
timeout -k 20 $((left + 30)) $py benchmarks/gpu_moe.py --out "$OUT" --budget "$left" "${extra[@]}" 2>&1 \
  | grep -v "^\[rank\|INFO rank" | tee "$OUT/moe_measure.log" | grep -E "^\[[0-9:]+\]|Error" | tail -40
pack_cache
echo "---- $((SECONDS - start)) s"
$py benchmarks/gpu_moe.py --out "$OUT" --report
