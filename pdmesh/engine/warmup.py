"""Warm start: run every kind of step serving will run before a worker says it is ready.

On a GPU the first use of a kernel variant compiles it (FlashInfer JIT-compiles its prefill and
decode variants, Triton specializes a kernel on its integer arguments being 1 or a multiple of 16)
and the first sampling call initializes generators; measured on a fresh machine, the first request
after "ready" took about 90 s, later ones milliseconds. ``warm_up`` pays that at start-up with dummy
requests through the engine's own paths (decode graphs are captured earlier, at engine build):

* prompt steps: a whole prompt, a prompt that hits the prefix cache (query shorter than the
  context), a prompt split over several steps (chunked prefill); greedy and sampled first tokens
  (temperature/top-p/top-k, penalties, logprobs);
* a prefill-only request whose KV is held, then released (the prefill worker's path);
* a remote-KV request admitted and activated (the decode worker's path), decoding in a batch with
  others (async scheduling's launch/collect, at batch 1 and above);
* the block-copy kernel of KV pulls at each specialization it meets (1, 16 and other block counts).

Afterwards the engine is as if new: no request, every block free and uncached (block ids as a fresh
engine's), prefix-cache and step counters at zero.
"""

from __future__ import annotations

import logging
import time

import torch

from pdmesh.engine.engine import LLMEngine, on_device
from pdmesh.engine.sequence import SamplingParams

log = logging.getLogger(__name__)

_PREFIX = "__warmup-"


def _tokens(n: int, vocab: int, salt: int) -> list[int]:
    return [(salt * 1009 + 7919 * i) % (vocab - 1) + 1 for i in range(n)]


def _drain(eng: LLMEngine, limit: int = 10_000) -> int:
    steps = 0
    while eng.has_work():
        eng.step()
        steps += 1
        if steps > limit:
            raise RuntimeError("warm-up did not finish")
    return steps


def _copy_kernels(eng: LLMEngine) -> None:
    """The KV pull's block copy at 1, 16 and other block counts, into the pool and into a staging
    buffer (the cross-GPU path), all on the null block, which no request owns."""
    from pdmesh.kv.copy import copy_blocks

    null = eng.pool.null_block
    for kv in eng.pool.ranks:  # with tensor parallelism rank 0 copies into every rank's pool, on its GPU
        with on_device(kv.device):
            for n in (1, 2, 16):
                src = torch.full((n,), null, dtype=torch.int64, device=kv.device)
                copy_blocks(kv, src, kv, src)
                staged = torch.empty((kv.shape[0], n) + tuple(kv.shape[2:]), dtype=kv.dtype, device=kv.device)
                copy_blocks(kv, src, staged, torch.arange(n, device=kv.device))
            if kv.device.type == "cuda":
                torch.cuda.synchronize(kv.device)


def warm_up(eng: LLMEngine) -> float:
    """Run the dummy requests above; returns the seconds it took. The engine must be idle."""
    if eng.has_work() or eng.blocks.requests or eng.held or eng.remote:
        raise RuntimeError("warm-up needs an idle engine")
    t0 = time.perf_counter()
    tiers, eng.tiers = eng.tiers, None  # dummy blocks stay out of the lower KV tiers
    events, eng.blocks.on_cache_event = eng.blocks.on_cache_event, None  # and out of routing hints
    eng.scheduler.prefetch = None
    vocab, bs = eng.arch.vocab_size, eng.pool.block_size
    budget = eng.config.scheduler.max_num_batched_tokens
    plen = max(2, min(2 * bs + 7, eng.max_model_len - 8))
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, presence_penalty=0.1, logprobs=2, seed=7,
                             max_tokens=3, ignore_eos=True)
    base = _tokens(plen, vocab, 1)
    eng.add_request(_PREFIX + "prompt", base, greedy)
    _drain(eng)
    hit = base[:max(1, (plen - 1) // bs) * bs] + _tokens(5, vocab, 2)  # full cached blocks, then 5 new tokens
    eng.add_request(_PREFIX + "prefix-hit", hit, sampled)
    long_len = min(budget + bs + 3, eng.max_model_len - 8, eng.blocks.num_blocks * bs // 4)
    if long_len > budget:  # a prompt over several steps (chunked prefill), next to the other request's decode
        eng.add_request(_PREFIX + "chunked", _tokens(long_len, vocab, 3), greedy)
    _drain(eng)
    eng.add_request(_PREFIX + "held", _tokens(plen, vocab, 4), greedy, prefill_only=True)
    _drain(eng)
    eng.release(_PREFIX + "held")
    batch = min(4, eng.config.scheduler.max_num_seqs)
    for i in range(batch):
        rid = f"{_PREFIX}remote-{i}"
        if eng.admit_remote(rid, _tokens(plen, vocab, 10 + i), 1, greedy.with_updates(max_tokens=6 + i)) is not None:
            eng.arrivals.landed(rid)  # as if its KV had landed (the KV contents do not matter here)
    _drain(eng)
    _copy_kernels(eng)
    if eng.blocks.requests or eng.held or eng.remote:
        raise RuntimeError("warm-up left requests behind")
    eng.blocks.reset()
    eng.tiers, eng.blocks.on_cache_event = tiers, events
    if tiers is not None:
        eng.scheduler.prefetch = eng.arrivals.start_load
    eng.num_steps = 0
    eng.num_steps_launched_behind = 0
    if eng.spec is not None:  # verify steps run the prompt kernels compiled above
        eng.spec.reset()
    dt = time.perf_counter() - t0
    log.info("warm-up done in %.1f s (kernels compiled, first request will not wait for them)", dt)
    return dt
