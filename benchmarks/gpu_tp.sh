#!/usr/bin/env bash
# Tensor parallelism on the 2-GPU machine (issue 19), checks then measurements, in ONE command
# bounded by TP_BUDGET seconds (default 450, FlashInfer's JIT compiles included):
#   1. tests/gpu/test_tp_gpu.py (at most 45% of the budget): TP 2 = TP 1 in float32 (ranks on GPUs
#      0,1 and 1,0), decode CUDA graphs with the all-reduce inside = eager (NCCL, symmetric memory,
#      FlashInfer's fused all-reduce + RMSNorm), mixed-TP KV hand-offs over cuda_ipc through a mesh
#   2. benchmarks/gpu_tp.py with the rest, refusing to measure unless the token tests passed:
#      all-reduces at decode sizes, qwen3-32b TP 2 decode vs its floor, llama-3.1-8b TP 2 vs TP 1,
#      qwen3-32b with each other all-reduce (what does not fit the budget is skipped and says so)
#   3. the table (benchmarks/gpu_tp.py --report); logs and JSON in $OUT
# Usage (GPU machine, nvidia-h200-x2; needs .whl/ from ../shared/gpu/fetch-wheels.sh, optionally .ficache.tgz.part-*):
#   OUT=$OUT PDMESH_COMMIT=abc bash benchmarks/gpu_tp.sh
#   OUT=$OUT bash benchmarks/gpu_tp.sh mesh [a] [b]    # qwen3-32b through pdmesh up, its own command (~6 min a layout)
#   bash benchmarks/gpu_tp.sh --cpu-smoke              # CPU: the same scripts (gloo, a tiny model; GPU tests skip)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-tp}; mkdir -p "$OUT"
BUDGET=${TP_BUDGET:-450}
start=$SECONDS
smoke=0; [ "${1:-}" = "--cpu-smoke" ] && { smoke=1; shift; }
. "$(dirname "$0")/gpu_env.sh"
[ $smoke = 1 ] || nvidia-smi topo -m | head -4
if [ "${1:-}" = "mesh" ]; then
  shift
  timeout -k 20 570 $py benchmarks/gpu_tp_mesh.py --out "$OUT" --layouts "${@:-a}" 2>&1 | grep -v "NIXL INFO" | tee "$OUT/tp_mesh.log" | grep "MESH\|Error"
  pack_cache
  $py benchmarks/gpu_tp.py --out "$OUT" --report
  exit 0
fi
# 1. tests (-v: each outcome is logged as it finishes; SIGINT at the limit still leaves them)
timeout -k 20 -s INT $((BUDGET * 45 / 100)) $py -m pytest -v -p no:cacheprovider tests/gpu/test_tp_gpu.py 2>&1 \
  | tee "$OUT/tp_tests.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" | tail -12
# 2. measurements with what is left (a minute kept for packing the cache and the table)
left=$((BUDGET - (SECONDS - start) - 30))
gate=(--tests "$OUT/tp_tests.log"); [ $smoke = 1 ] && gate=(--cpu-smoke)
timeout -k 20 $((left + 30)) $py benchmarks/gpu_tp.py --out "$OUT" --budget "$left" "${gate[@]}" 2>&1 \
  | grep -v "^\[rank" | tee "$OUT/tp_measure.log" | grep -E "^\[[0-9:]+\]|Error" | tail -40
pack_cache
echo "---- $((SECONDS - start)) s"
$py benchmarks/gpu_tp.py --out "$OUT" --report
