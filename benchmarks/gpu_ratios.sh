#!/usr/bin/env bash
# Prefill:decode ratios against colocated serving on the 4-GPU machine (issue 24), in ONE command
# bounded by RATIOS_BUDGET seconds for the measurements (default 500 of the device's 600 a command:
# the rest installs the wheels and packs the results):
# benchmarks/gpu_ratios.py (1P3D, 2P2D, 3P1D and 4 colocated replicas through pdmesh up, tokens
# checked before load, a concurrency sweep per shape until each layout misses TPOT 35 ms, what does
# not fit the budget skipped and said), then the layout model against the runs. Everything comes back
# in $OUT/ratios-results.tgz (the per-request JSON, model-vs-measured.md, tables, logs); the compile
# cache in parts (pack_cache) for the next call.
# Usage (GPU machine, nvidia-h200-x4; needs .whl/ from ../shared/gpu/fetch-wheels.sh, optionally .ficache.tgz.part-*):
#   OUT=$OUT PDMESH_COMMIT=abc bash benchmarks/gpu_ratios.sh [gpu_ratios.py flags, e.g. --layouts 1P3D 2P2D]
#   bash benchmarks/gpu_ratios.sh --cpu-smoke        # CPU: 1P1D and 2 colocated, smollm2-135m, tiny shapes
set -uo pipefail
OUT=${OUT:-/tmp/gpu-ratios}; mkdir -p "$OUT"
BUDGET=${RATIOS_BUDGET:-500}
smoke=0; [ "${1:-}" = "--cpu-smoke" ] && { smoke=1; shift; }
. "$(dirname "$0")/gpu_env.sh"
extra=(); [ $smoke = 1 ] && extra=(--cpu-smoke)
# reference tokens are kept in .gpu-ref/ (carry it to the next call to skip the reference engine)
timeout -k 20 $((BUDGET + 50)) $py benchmarks/gpu_ratios.py --out "$OUT/ratios" --budget "$BUDGET" --reference-dir .gpu-ref \
  "${extra[@]}" "$@" 2>&1 | tee "$OUT/ratios.log" | grep -E "^\[[0-9:]+\]|Error|error" | tail -60
for f in "$OUT"/ratios/*/model-vs-measured.md; do [ -f "$f" ] && { echo "==== $f"; cat "$f"; }; done
cp "$OUT"/ratios/ratios-summary.json "$OUT"/ 2>/dev/null
[ -d .gpu-ref ] && cp -r .gpu-ref "$OUT/gpu-ref"   # back as $OUT/gpu-ref: put it at .gpu-ref/ and carry it next time
for d in "$OUT"/ratios/*/; do rm -rf "$d/work/tok"; done
tar czf "$OUT/ratios-results.tgz" -C "$OUT" ratios ratios.log && rm -rf "$OUT/ratios"
pack_cache
