# Sourced by the one-command GPU scripts (gpu_tp.sh, gpu_moe.sh, gpu_big.sh) once $smoke (0, or 1 for --cpu-smoke)
# and $OUT are set.  On the GPU machine: installs .whl/ into /tmp/site, sets the environment
# (FlashInfer's compile cache in .ficache, restored from .ficache.tgz.part-*; NVLink multicast off)
# and prints the GPUs.  Sets $py; defines pack_cache, which returns FlashInfer's compile cache in
# parts under 16 MB (the limit on returned files).
if [ "$smoke" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} FLASHINFER_WORKSPACE_BASE=$PWD/.ficache \
    PDMESH_CACHE_DIR=/tmp/pdmesh-cache NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  mkdir -p .ficache && ls .ficache.tgz.part-* >/dev/null 2>&1 && cat .ficache.tgz.part-* | tar xzf -
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  py=python3
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  py=${PYTHON:-python}
fi
export PYTHONUNBUFFERED=1
pack_cache() { [ "$smoke" = 1 ] || { rm -f "$OUT"/ficache.tgz.part-*; tar czf - .ficache | split -b 15M - "$OUT/ficache.tgz.part-"; }; }
