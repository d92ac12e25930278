"""``LLMEngine``: one model, one KV pool, one scheduler; ``step() = schedule -> run -> postprocess``.

Not thread-safe: exactly one thread (the worker's engine thread, or the caller of ``LLM``) calls
it.  Roles in the mesh:

* colocated / offline: ``add_request`` then ``step`` until finished.
* prefill: ``add_request(prefill_only=True)``: after the prompt it samples the first token; if
  the request goes on, its blocks are kept (status HELD) and reported in the output, until
  ``release(request_id)``.
* decode: ``admit_remote`` allocates blocks for a prompt computed elsewhere (reusing local prefix
  cache hits) and returns which of them must be filled; once the caller has written the KV,
  ``activate_remote`` queues the request to generate from its first token on.

KV ownership: every allocated block belongs to exactly the request ids in the block manager;
``abort``/``release``/finishing free them at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from pdmesh.attention import select_backend
from pdmesh.config import EngineConfig
from pdmesh.engine.runner import ModelRunner
from pdmesh.engine.scheduler import Scheduler
from pdmesh.engine.sequence import RequestOutput, SamplingParams, Sequence, SequenceStatus
from pdmesh.kv.block_manager import PrefixCachingBlockManager
from pdmesh.kv.pool import KVCachePool, num_blocks_for_memory
from pdmesh.models.loader import ResolvedModel, load_model, resolve

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class RequestRejected(ValueError):
    """A request can never run here (too long, or larger than the whole KV pool)."""


@dataclass(frozen=True)
class RemoteAdmission:
    """Decode side: where a remote prompt's KV must land."""

    block_ids: list[int]
    """All local blocks of the prompt, in token order."""
    num_cached_blocks: int
    """Leading blocks already present from the local prefix cache (not to be pulled)."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_waiting_for_kv: int
    num_held: int
    free_blocks: int
    total_blocks: int
    held_blocks: int
    prefix_queries: int
    prefix_hits: int


class LLMEngine:
    def __init__(self, config: EngineConfig, resolved: Optional[ResolvedModel] = None) -> None:
        self.config = config
        self.device = pick_device(config.device.device)
        if self.device.type == "cpu" and config.device.cpu_threads:
            torch.set_num_threads(config.device.cpu_threads)
        self.dtype = pick_dtype(config.model.dtype, self.device)
        self.resolved = resolved or resolve(config.model)
        arch = self.resolved.arch
        self.arch = arch
        self.max_model_len = config.model.max_model_len or arch.max_position_embeddings
        self.model = load_model(self.resolved, self.dtype, self.device, self.max_model_len, config.model.seed)
        self.eos_token_ids = frozenset(arch.eos_token_ids)
        num_blocks = config.cache.num_kv_blocks or self._size_kv(config)
        self.pool = KVCachePool(arch, num_blocks, config.cache.block_size, self.dtype, self.device)
        self.blocks = PrefixCachingBlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.backend = select_backend(config.device.attention_backend, self.device, arch.num_heads, arch.num_kv_heads,
                                      arch.head_dim, self.dtype)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        if self.device.type == "cuda" and config.device.fused_kernels and self.backend.name == "flashinfer":
            self.model.enable_fused_kernels()
        self.runner = ModelRunner(self.model, self.pool, self.blocks, self.backend, self.device)
        if self.device.type == "cuda" and self.backend.name == "flashinfer" and not config.device.enforce_eager:
            self.runner.capture_decode_graphs(config.scheduler.max_num_seqs, self.max_model_len)
        self.held: dict[str, Sequence] = {}
        self.remote: dict[str, Sequence] = {}
        self.num_steps = 0
        self.last_step_kind = ""
        """'decode' (one new token per sequence), 'prefill' (prompt tokens only) or 'mixed', for the
        latest step that ran a batch (step-time metrics by kind)."""
        log.info("engine ready: %s on %s/%s, %d KV blocks of %d tokens, attention=%s",
                 arch.architecture, self.device, self.dtype, num_blocks, config.cache.block_size, self.backend.name)

    def _size_kv(self, config: EngineConfig) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            mine = torch.cuda.memory_reserved(self.device)  # this process's weights so far
            # This worker's share of the GPU, minus what it holds, minus room for activations and
            # graphs; never more than what is actually free (other processes may share the GPU).
            budget = min(int(total * config.cache.gpu_memory_utilization) - mine, free) - (2 << 30)
            if budget <= 0:
                raise RuntimeError("no GPU memory left for the KV cache; raise --gpu-memory-utilization")
            return num_blocks_for_memory(self.arch, config.cache.block_size, self.dtype, budget)
        return num_blocks_for_memory(self.arch, config.cache.block_size, self.dtype, config.cache.kv_cache_memory)

    # ------------------------------------------------------------------ requests
    def set_eos_token_ids(self, ids: frozenset[int]) -> None:
        """Add the tokenizer's EOS ids to the model config's."""
        self.eos_token_ids = frozenset(self.eos_token_ids | ids)

    def check_request(self, prompt_len: int, params: SamplingParams) -> None:
        if prompt_len < 1:
            raise RequestRejected("the prompt is empty")
        if prompt_len + params.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len {self.max_model_len}"
            )
        need = self.blocks.blocks_needed(prompt_len + params.max_tokens)
        if need > self.blocks.num_blocks:
            raise RequestRejected(f"request needs {need} KV blocks; this worker has {self.blocks.num_blocks}")

    def _new_seq(self, request_id: str, token_ids: list[int], prompt_len: int, params: SamplingParams, prefill_only: bool) -> Sequence:
        if self.blocks.has_request(request_id) or request_id in self.held or request_id in self.remote:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        return Sequence(request_id, token_ids, prompt_len, params, self.eos_token_ids, prefill_only=prefill_only)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prefill_only: bool = False) -> None:
        self.check_request(len(prompt_token_ids), params)
        seq = self._new_seq(request_id, list(prompt_token_ids), len(prompt_token_ids), params, prefill_only)
        self.scheduler.add(seq)

    def admit_remote(self, request_id: str, prompt_token_ids: list[int], first_token: int, params: SamplingParams) -> Optional[RemoteAdmission]:
        """Allocate blocks for a prompt whose KV another worker computed; None if no room now."""
        self.check_request(len(prompt_token_ids), params)
        seq = self._new_seq(request_id, list(prompt_token_ids) + [first_token], len(prompt_token_ids), params, False)
        hit = self.blocks.lookup_prefix(seq.token_ids)
        if self.blocks.allocate(request_id, seq.num_prompt_tokens, hit) is None:
            return None
        self.blocks.record_prefix_query(seq.num_prompt_tokens, hit.num_tokens)
        seq.num_cached_tokens = hit.num_tokens
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.remote[request_id] = seq
        return RemoteAdmission(list(self.blocks.block_table(request_id)), len(hit.block_ids))

    def activate_remote(self, request_id: str) -> bool:
        """The remote KV has landed: queue the request for decoding. False if it was aborted."""
        seq = self.remote.pop(request_id, None)
        if seq is None:
            return False
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.blocks.cache_full_blocks(request_id, seq.token_ids, seq.num_computed_tokens)
        self.scheduler.add(seq)
        return True

    def recompute_remote(self, request_id: str) -> bool:
        """The remote KV could not be had (failed pull): free what was allocated for it and queue the
        request to compute its prompt here — like a preempted request, it re-prefills prompt + token 0
        and goes on from token 1.  False if it was aborted meanwhile."""
        seq = self.remote.pop(request_id, None)
        if seq is None:
            return False
        self.blocks.free(request_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.scheduler.add(seq)
        return True

    def abort(self, request_id: str) -> bool:
        """Drop the request wherever it is and free its blocks at once."""
        seq = self.scheduler.remove(request_id) or self.remote.pop(request_id, None) or self.held.pop(request_id, None)
        freed = self.blocks.free(request_id)
        if seq is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
        return seq is not None or freed > 0

    def release(self, request_id: str) -> bool:
        """Prefill side: the decode worker has the KV (or gave up): free the held blocks."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self.blocks.free(request_id)
        return True

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [vocab] (float32) after ``token_ids``, computed in one pass through the paged
        cache (blocks borrowed and returned at once; the prefix cache is neither read nor fed)."""
        from pdmesh.engine.scheduler import ScheduledBatch

        rid = f"__score-{self.num_steps}-{id(token_ids)}"
        if self.blocks.allocate(rid, len(token_ids)) is None:
            raise RequestRejected("not enough free KV blocks to score this sequence now")
        try:
            seq = Sequence(rid, list(token_ids), len(token_ids), SamplingParams(), self.eos_token_ids)
            logits, _ = self.runner.forward(ScheduledBatch([seq], [len(token_ids)]))
            return logits[0]
        finally:
            self.blocks.free(rid)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        decoding = sum(1 for seq in batch.seqs if seq.num_computed_tokens >= seq.num_tokens - 1)
        self.last_step_kind = "decode" if decoding == len(batch.seqs) else "prefill" if decoding == 0 else "mixed"
        started = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = started
        result = self.runner.run(batch)
        return self.postprocess(batch, result)

    def postprocess(self, batch, result) -> list[RequestOutput]:
        self.num_steps += 1
        now = time.monotonic()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.blocks.cache_full_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)
        outputs = []
        for seq, tok, lp in zip(result.sampled_seqs, result.token_ids, result.logprobs):
            seq.token_ids.append(tok)
            reason = self._finish_reason(seq, tok)
            out = RequestOutput(
                seq.request_id, [tok], reason is not None, reason, [lp] if lp is not None else None,
                seq.num_prompt_tokens, seq.num_cached_tokens,
                queue_time=seq.first_scheduled_time - seq.arrival_time,
                prefill_time=now - seq.first_scheduled_time if seq.num_output_tokens == 1 else None,
            )
            if reason is not None:
                self._finish(seq, reason)
            elif seq.prefill_only:
                out.finished = True
                out.held_block_ids = list(self.blocks.block_table(seq.request_id))
                self.scheduler.remove(seq.request_id)
                seq.status = SequenceStatus.HELD
                self.held[seq.request_id] = seq
            outputs.append(out)
        return outputs

    def _finish_reason(self, seq: Sequence, tok: int) -> Optional[str]:
        p = seq.params
        if seq.num_output_tokens > p.min_tokens:  # EOS/stop ids are masked before that
            if (not p.ignore_eos and tok in seq.eos_token_ids) or tok in p.stop_token_ids:
                return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq.request_id)
        self.blocks.free(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ------------------------------------------------------------------ introspection
    def stats(self) -> EngineStats:
        held = sum(len(self.blocks.block_table(r)) for r in self.held if self.blocks.has_request(r))
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_waiting_for_kv=len(self.remote),
            num_held=len(self.held),
            free_blocks=self.blocks.num_free_blocks,
            total_blocks=self.blocks.num_blocks,
            held_blocks=held,
            prefix_queries=self.blocks.prefix_queries,
            prefix_hits=self.blocks.prefix_hits,
        )
