#!/usr/bin/env bash
# The whole GPU check-and-measure pass on the GPU machine, in one command (see results/README.md).
# Needs .whl/ (../shared/gpu/fetch-wheels.sh click h11), optionally .ficache.tgz (FlashInfer's
# compile cache from an earlier pass) and .gpu_tok/ (a tokenizer dir for the mesh smoke test).
# Usage: OUT=/some/dir bash benchmarks/gpu_pass.sh [tests|bench|grammar|mesh|kv|kvtiers|moe|quant ...]   (default: tests bench grammar mesh)
# 'moe' (mixture of experts: benchmarks/gpu_moe.py, needs 2 GPUs for its TP/EP part; gpu_moe.sh runs it with its tests).
# 'quant' (online FP8/INT8 and n-gram speculation, benchmarks/gpu_quant_spec.py; QUANT_ARGS e.g. --fp8-kv)
# runs its end-to-end part when the embedded GGUF travelled split into .gpu_gguf/part-* (git-ignored).
# The grammar stage needs xgrammar's wheel in .whl/ (fetch-wheels.sh xgrammar==0.2.9).
# 'kvtiers' (multi-level KV cache and prefix routing, one H200, about 8 minutes with a cold compile cache; run it alone)
# needs only .whl/; its JSON and the services' logs land in $OUT (kv_tiers.json, kv_tiers-*.log).
# 'kv' (KV transfer over cuda_ipc and NIXL, and the mesh over NIXL across two GPUs) needs nixl-cu13
# importable: PYTHONPATH=$PWD/.gpu-site bash benchmarks/gpu_pass.sh kv
set -uo pipefail
OUT=${OUT:-/tmp/gpu-pass}; mkdir -p "$OUT"
stages=${*:-tests bench grammar mesh}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=$PWD/.ficache PDMESH_CACHE_DIR=/tmp/pdmesh-cache
mkdir -p .ficache && ls .ficache.tgz.part-* >/dev/null 2>&1 && cat .ficache.tgz.part-* | tar xzf -
nvidia-smi --query-gpu=name,memory.total --format=csv
# FlashInfer's compile cache comes back in parts under 16 MB (the limit on returned files).
pack_cache() { rm -f "$OUT"/ficache.tgz.part-*; tar czf - .ficache | split -b 15M - "$OUT/ficache.tgz.part-"; }
for s in $stages; do
  case $s in
    tests) timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
           pack_cache ;;
    bench) timeout 420 python3 benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" --commit "${PDMESH_COMMIT:-}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.log" ;;
    grammar) timeout 420 python3 benchmarks/gpu_grammar.py --preset llama-3.1-8b --batch 64 --ctx 1024 \
             --out "$OUT/gpu_grammar.json" 2>&1 | tee "$OUT/gpu_grammar.log" ;;
    moe)   timeout 480 python3 benchmarks/gpu_moe.py --out "$OUT" --budget 420 2>&1 | grep -v "INFO rank" | tee "$OUT/moe.log" | grep "^\[" ;;
    mesh)  timeout 240 python3 benchmarks/gpu_mesh_smoke.py qwen2.5-0.5b .gpu_tok 2>&1 | tail -40 | tee "$OUT/gpu_mesh.log" ;;
    quant) gg=""; if ls .gpu_gguf/part-* >/dev/null 2>&1; then cat .gpu_gguf/part-* > /tmp/smollm2.gguf && gg="--gguf /tmp/smollm2.gguf"; fi
           timeout 480 python3 benchmarks/gpu_quant_spec.py --out "$OUT/quant_spec.json" --commit "${PDMESH_COMMIT:-}" \
             $gg ${QUANT_ARGS:-} 2>&1 | tee "$OUT/quant_spec.log" ;;
    kv)    timeout 480 python3 benchmarks/gpu_kv_transfer.py pulls mesh --out "$OUT/kv_transfer.json" --tok .gpu_tok 2>&1 \
             | grep -v "NIXL INFO" | tail -60 | tee "$OUT/kv_transfer.log" ;;
    kvtiers) timeout 560 python3 benchmarks/gpu_kv_tiers.py --out "$OUT/kv_tiers.json" 2>&1 | grep -v " INFO " | tail -80 \
             | tee "$OUT/kv_tiers.log" ;;
  esac
done
pack_cache
[ -f "$OUT/gpu_bench.json" ] && python3 benchmarks/gpu_table.py "$OUT/gpu_bench.json" | tee "$OUT/table.txt"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" 2>/dev/null | tail -3
grep "^MESH" "$OUT/gpu_mesh.log" 2>/dev/null
grep -E "^(config|tokens|KVT skipped)|^(none|host|2 prefill)" "$OUT/kv_tiers.log" 2>/dev/null
