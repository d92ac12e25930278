"""``build_shard``: what every rank of a worker builds the same way — its part of the model, its KV
pool, the attention backend and the model runner (with its CUDA graphs).

Rank 0 (``LLMEngine``) and the other ranks (``pdmesh.distributed.ranks``) both call it, so they
take the same steps in the same order, including the collectives inside it (the agreed number of
KV blocks, and on GPUs the graph captures, whose warm-up runs all-reduce).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pdmesh.attention import BaseAttentionBackend, select_backend
from pdmesh.config import EngineConfig
from pdmesh.distributed.group import TPGroup
from pdmesh.engine.runner import ModelRunner
from pdmesh.kv.pool import KVCachePool, num_blocks_for_memory
from pdmesh.models.loader import ResolvedModel, load_model
from pdmesh.models.transformer import CausalLM

log = logging.getLogger(__name__)


@dataclass
class Shard:
    model: CausalLM
    pool: KVCachePool
    backend: BaseAttentionBackend
    runner: ModelRunner
    num_blocks: int


def kv_cache_dtype(config: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """Element type of the KV pool (``--kv-cache-dtype``): the model dtype, or fp8 e4m3."""
    return torch.float8_e4m3fn if config.cache.kv_cache_dtype == "fp8" else dtype


def size_kv(config: EngineConfig, resolved: ResolvedModel, device: torch.device, dtype: torch.dtype, tp: int) -> int:
    """KV blocks (of ``dtype`` elements) this rank's pool can hold: its share of the GPU (``--gpu-memory-utilization``) minus
    what the process already holds and a working reserve, or ``--kv-cache-memory`` on CPU."""
    arch, bs = resolved.arch, config.cache.block_size
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        mine = torch.cuda.memory_reserved(device)  # this process's weights so far
        # This worker's share of the GPU, minus what it holds, minus room for activations and
        # graphs; never more than what is actually free (other processes may share the GPU).
        budget = min(int(total * config.cache.gpu_memory_utilization) - mine, free) - (2 << 30)
        if budget <= 0:
            raise RuntimeError(f"no GPU memory left for the KV cache on {device}; raise --gpu-memory-utilization")
        return num_blocks_for_memory(arch, bs, dtype, budget, tp)
    return num_blocks_for_memory(arch, bs, dtype, config.cache.kv_cache_memory, tp)


def build_shard(config: EngineConfig, resolved: ResolvedModel, tp: TPGroup, dtype: torch.dtype, max_model_len: int) -> Shard:
    """This rank's model, pool, backend and runner (graphs captured when they apply); the runner's
    block manager and followers are rank 0's to set."""
    device, arch = tp.device, resolved.arch
    t0 = time.perf_counter()
    ep = config.device.enable_expert_parallel and arch.num_experts > 0
    log.info("loading %s (%s weights, %.1f B parameters%s%s) on %s", resolved.served_name, resolved.load_format,
             arch.num_parameters() / 1e9, f", rank {tp.rank} of {tp.size}" if tp.size > 1 else "",
             f", experts {tp.rank * arch.num_experts // tp.size}-{(tp.rank + 1) * arch.num_experts // tp.size - 1}" if ep else "",
             device)
    model = load_model(resolved, dtype, device, max_model_len, config.model.seed, tp, config.device.enable_expert_parallel,
                       config.model.quantization)
    log.info("weights loaded in %.1f s", time.perf_counter() - t0)
    tp.enable_fused_norm(config.scheduler.max_num_seqs, arch.hidden_size, dtype)  # --tp-all-reduce flashinfer only
    kv_dtype = kv_cache_dtype(config, dtype)
    num_blocks = tp.min_int(config.cache.num_kv_blocks or size_kv(config, resolved, device, kv_dtype, tp.size))
    pool = KVCachePool(arch, num_blocks, config.cache.block_size, kv_dtype, device, tp.size, shared=tp.rank > 0)
    backend = select_backend(config.device.attention_backend, device, arch.num_heads // tp.size, pool.layout.local_kv_heads,
                             arch.head_dim, dtype, config.cache.block_size, config.device.decode_attention, kv_dtype)
    if device.type == "cuda" and config.device.fused_kernels and backend.name == "flashinfer":
        model.enable_fused_kernels()
    runner = ModelRunner(model, pool, None, backend, device)
    if device.type == "cuda" and backend.name == "flashinfer" and not config.device.enforce_eager:
        log.info("capturing decode CUDA graphs (first use compiles the decode kernels)")
        runner.capture_decode_graphs(config.scheduler.max_num_seqs, max_model_len)
    return Shard(model, pool, backend, runner, num_blocks)
