#!/usr/bin/env bash
# The `pdmesh up` pass on the 2-GPU machine (issue: pdmesh up on real hosts), stage by stage:
#   up     warm start on a fresh machine (empty compile caches) and KV pulls under load (gpu_up.py)
#   tests  tests/gpu/test_placement_mesh.py (every placement through pdmesh up) and the rest of tests/gpu
#   pd     disaggregated vs colocated at 3500:1500 through pdmesh up (gpu_pd_vs_colocated.py), with pulls under load
# Usage: OUT=/dir PDMESH_COMMIT=abc bash benchmarks/gpu_up.sh up tests
set -uo pipefail
OUT=${OUT:-/tmp/gpu-up}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=$PWD/.ficache PDMESH_CACHE_DIR=/tmp/pdmesh-cache
mkdir -p .ficache
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
for s in "$@"; do
  case $s in
    up)    timeout 570 python3 benchmarks/gpu_up.py --out "$OUT/up.json" 2>&1 | tail -30 ;;
    tests) timeout 570 python3 -m pytest -q -p no:cacheprovider -x tests/gpu/test_placement_mesh.py tests/gpu 2>&1 \
             | tee "$OUT/gpu_tests.log" | tail -30 ;;
    pd)    timeout ${PD_TIMEOUT:-570} python3 benchmarks/gpu_pd_vs_colocated.py --out "$OUT/pd" ${PD_ARGS:-} 2>&1 | tee "$OUT/pd.log" | tail -25
           python3 benchmarks/gpu_pd_report.py "$OUT/pd" | tee "$OUT/pd-table.md"
           cp "$OUT/pd/pd-summary.json" "$OUT/" 2>/dev/null
           tar czf "$OUT/pd-results.tgz" -C "$OUT" pd && rm -rf "$OUT/pd" ;;
    pack)  tar czf - .ficache | split -b 15M - "$OUT/ficache.tgz.part-" ;;
  esac
done
