#!/usr/bin/env bash
# Qwen3-235B-A22B served disaggregated (issue 23) in ONE command bounded by BIG_BUDGET seconds
# (default 560: under the GPU machine's 10 minutes a command; wheels, compiles and packing included):
# benchmarks/gpu_big.py (engines TP vs EP, the tokens' reference; then the disaggregated mesh, two
# colocated replicas and, with NIXL importable, the mesh over NIXL, each through pdmesh up and
# pdmesh bench; what does not fit is skipped and named in big.json), then its table.
# $OUT gets big.json, big.log, big-work.tgz (bench results with every request, every log), the cache.
# Usage (GPU machine; needs .whl/ from ../shared/gpu/fetch-wheels.sh click h11, optionally .ficache.tgz.part-*):
#   OUT=$OUT PDMESH_COMMIT=abc bash benchmarks/gpu_big.sh --gpus 8                   # nvidia-h200-x8, full size
#   OUT=$OUT PDMESH_COMMIT=abc bash benchmarks/gpu_big.sh --gpus 2 --tp 2 --layers 8  # nvidia-h200-x2, cut preset
#   bash benchmarks/gpu_big.sh --cpu-smoke                                            # CPU: the same orchestration
# Further flags go to gpu_big.py (--layouts, --shapes, --concurrency, --ep on|off: see its --help).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-big}; mkdir -p "$OUT"
BUDGET=${BIG_BUDGET:-560}
start=$SECONDS
smoke=0; [ "${1:-}" = "--cpu-smoke" ] && smoke=1
. "$(dirname "$0")/gpu_env.sh"
[ $smoke = 1 ] || nvidia-smi topo -m | head -10
left=$((BUDGET - (SECONDS - start) - 25))   # what the measurements may take; the rest packs the results
timeout -k 20 $((left + 20)) $py benchmarks/gpu_big.py --out "$OUT" --budget "$left" "$@" 2>&1 \
  | grep -v "NIXL INFO\|^\[rank" | tee "$OUT/big.log" | grep -E "^\[[0-9:]+\]|Error"
pack_cache
# at most 8 files come back: the bench results (every request) and every log in one archive
tar czf "$OUT/big-work.tgz" -C "$OUT" --exclude "*.pt" --exclude tok --exclude mesh-secret work && rm -rf "$OUT/work"
echo "---- $((SECONDS - start)) s"
$py benchmarks/gpu_big.py --out "$OUT" --report
