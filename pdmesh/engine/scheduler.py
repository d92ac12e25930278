"""Continuous batching inside one worker.

Each step gets a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``):

1. Running sequences first, in admission order: a decode takes 1 token (1 + its draft tokens
   with speculative decoding, drafts cut to the budget), an unfinished chunked prefill takes the
   rest of its prompt up to the budget.  When the block manager cannot extend a
   sequence, the most recently admitted running sequence is preempted (recompute: blocks freed,
   sent to the front of the waiting queue) until it can — possibly the sequence itself; a
   sequence's draft tokens are dropped before anyone is preempted for it.
2. Then waiting sequences, FIFO, while budget, cap and blocks allow.  A sequence admitted for the
   first time looks up its prefix in the cache and only computes the rest (unless it asked for
   prompt logprobs, which need every prompt position computed).  With lower KV tiers, a sequence
   whose prefix goes on in host memory or on disk is handed to ``prefetch`` instead: it leaves the
   queue while its blocks load and comes back at the front with them computed.

The scheduler changes ``num_computed_tokens`` only when admitting (prefix hits) or preempting;
the engine advances it after the step ran.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from pdmesh.config import SchedulerConfig
from pdmesh.engine.sequence import Sequence, SequenceStatus
from pdmesh.kv.block_manager import PrefixCachingBlockManager, PrefixHit


@dataclass
class ScheduledBatch:
    """What one step runs: each sequence with its number of new tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: PrefixCachingBlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        """Sequences preempted (recompute) so far (counter)."""
        self.prefetch: Optional[Callable[[Sequence, PrefixHit], bool]] = None
        """Lower KV tiers (the engine's): given a sequence admitted for the first time and its device
        prefix hit, True when it took the sequence to load more of its prefix (blocks allocated,
        the sequence out of the queue until the engine requeues it with those tokens computed)."""

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def remove(self, request_id: str) -> Optional[Sequence]:
        """Take a sequence out of both queues (blocks untouched); None if absent."""
        for i, s in enumerate(self.running):
            if s.request_id == request_id:
                return self.running.pop(i)
        for s in self.waiting:
            if s.request_id == request_id:
                self.waiting.remove(s)
                return s
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        seq.spec_token_ids = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.cfg.max_num_batched_tokens
        chunked = self.cfg.enable_chunked_prefill
        i = 0
        while i < len(self.running) and budget > 0 and len(out) < self.cfg.max_num_seqs:
            seq = self.running[i]
            if seq.spec_token_ids:  # a decode with drafts: as many as the budget allows
                del seq.spec_token_ids[budget - 1:]
            remaining = seq.num_tokens - seq.num_computed_tokens + len(seq.spec_token_ids)
            n = min(remaining, budget) if chunked else remaining
            if n > budget:
                break
            while self.blocks.allocate(seq.request_id, seq.num_computed_tokens + n) is None:
                if seq.spec_token_ids:  # drop the drafts before preempting anyone
                    n -= len(seq.spec_token_ids)
                    seq.spec_token_ids = []
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # ``seq`` itself was preempted
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            first = not self.blocks.has_request(seq.request_id)
            # prompt logprobs need every prompt position computed: no prefix-cache hits then
            hit = self.blocks.lookup_prefix(seq.token_ids) if first and not seq.wants_prompt_logprobs else None
            if hit is not None and self.prefetch is not None and self.prefetch(seq, hit):
                self.waiting.popleft()
                continue
            computed = hit.num_tokens if hit is not None else seq.num_computed_tokens
            remaining = seq.num_tokens - computed
            n = min(remaining, budget) if chunked else remaining
            if n > budget or self.blocks.allocate(seq.request_id, computed + n, hit) is None:
                break
            if hit is not None:
                self.blocks.record_prefix_query(seq.num_tokens, hit.num_tokens)
                seq.num_computed_tokens = hit.num_tokens
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = hit.num_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return out
