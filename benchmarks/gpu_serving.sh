#!/usr/bin/env bash
# The serving benchmark on the GPU machine (two GPUs of one host): the llama-3.1-8b dummy
# preset served disaggregated and colocated through the gateway, 3500:OUT and 2500:OUT random
# workloads, a max-concurrency sweep (see benchmarks/gpu_serving.py).  Stage '1gpu' runs the two
# one-GPU layouts at once, each on its own GPU; stage '2gpu' runs the two-GPU layouts in turn.
# Needs .whl/ and optionally .ficache.tgz.part-* (see benchmarks/gpu_pass.sh).
# Usage: OUT=/dir SERVING_ARGS="--shapes 3500:256 2500:256" bash benchmarks/gpu_serving.sh [1gpu] [2gpu]
set -uo pipefail
OUT=${OUT:-/tmp/gpu-serving}; mkdir -p "$OUT"
stages=${*:-1gpu 2gpu}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=$PWD/.ficache PDMESH_CACHE_DIR=/tmp/pdmesh-cache
mkdir -p .ficache && ls .ficache.tgz.part-* >/dev/null 2>&1 && cat .ficache.tgz.part-* | tar xzf -
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
run() { python3 benchmarks/gpu_serving.py --layout "$1" --gpus $2 --out "$OUT" --commit "${PDMESH_COMMIT:-}" ${SERVING_ARGS:-} \
          > "$OUT/$1.log" 2>&1; echo "$1 exit $?" | tee -a "$OUT/$1.log"; }
for s in $stages; do
  case $s in
    1gpu) run disagg-1gpu 0 & run colocated-1gpu 1 & wait ;;
    2gpu) run disagg-2gpu "0 1"; run colocated-2gpu "0 1" ;;
  esac
done
grep -h "^\[" "$OUT"/*.log | grep -v "mesh up"
python3 benchmarks/gpu_serving_report.py "$OUT" 2>&1 | tail -30
# few files come back from the machine: results and logs in one archive, the compile cache apart
(cd "$OUT" && tar czf serving-results.tgz --remove-files serving-*.json serving_summary.json log-*.txt *.log)
[ -n "${PACK_FICACHE:-}" ] && tar czf - .ficache | split -b 15M - "$OUT/ficache.tgz.part-"
ls -la "$OUT"
