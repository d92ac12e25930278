"""``Arrivals``: requests whose prompt KV lands in the device pool from outside it — pulled from a
prefill worker (decode side, ``LLMEngine.admit_remote`` / ``start_pull``) or loaded from a lower KV
tier (host memory, disk: the scheduler's ``prefetch``) — between their admission and their queueing.
Engine state with one owner (``LLMEngine.arrivals``; engine thread only).

Lifecycle: admitted (blocks allocated, status WAITING_FOR_KV, in ``waiting``), its copy runs in the
connector, then one of

* ``landed``: a pull ended; the prompt counts as computed and the request is queued to decode;
* ``recompute``: a pull failed under the 'recompute' policy; its blocks are freed and the prompt is
  computed here (like a preempted request: prompt + token 0 again, then on from token 1);
* ``settle_load``: a tier load ended; the blocks that arrived intact count as computed and the
  request is requeued at the front (the rest of its prompt is computed as usual).

An aborted request leaves ``waiting`` at once (``LLMEngine.abort``); blocks its copy may still write
wait in the connector's quarantine.
"""

from __future__ import annotations

import logging
from typing import Optional

from pdmesh.engine.connector import KVConnector
from pdmesh.engine.offload import LOAD_TIMEOUT_S, KVTiers, TierLoadJob
from pdmesh.engine.scheduler import Scheduler
from pdmesh.engine.sequence import Sequence, SequenceStatus
from pdmesh.kv.audit import KVAudit
from pdmesh.kv.block_manager import PrefixCachingBlockManager, PrefixHit

log = logging.getLogger(__name__)


class Arrivals:
    """The requests whose prompt KV is arriving, and what happens when it has (see module docstring)."""

    def __init__(self, blocks: PrefixCachingBlockManager, scheduler: Scheduler, connector: KVConnector,
                 audit: Optional[KVAudit], tiers: Optional[KVTiers]) -> None:
        self.blocks, self.scheduler, self.connector, self.audit, self.tiers = blocks, scheduler, connector, audit, tiers
        self.waiting: dict[str, Sequence] = {}
        """Requests waiting for (or receiving) their prompt's KV, by request id."""

    def landed(self, request_id: str) -> bool:
        """A pulled prompt's KV is in place: queue the request for decoding.  False if it was aborted."""
        seq = self.waiting.pop(request_id, None)
        if seq is None:
            return False
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.blocks.cache_full_blocks(request_id, seq.token_ids, seq.num_computed_tokens)
        if self.audit is not None:
            self.audit.record(request_id, self.blocks.block_table(request_id), seq.num_prompt_tokens)
        self.scheduler.add(seq)
        return True

    def recompute(self, request_id: str) -> bool:
        """The remote KV could not be had (failed pull): free what was allocated for it and queue the
        request to compute its prompt here.  False if it was aborted meanwhile."""
        seq = self.waiting.pop(request_id, None)
        if seq is None:
            return False
        if self.audit is not None:
            self.audit.forget(request_id)
        self.blocks.free(request_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.scheduler.add(seq)
        return True

    def start_load(self, seq: Sequence, hit: PrefixHit) -> bool:
        """The scheduler's ``prefetch``: if the lower tiers hold more of ``seq``'s prefix than the
        device, allocate its blocks and start loading them (True: the sequence waits here until
        ``settle_load``); else False, and it is computed as usual."""
        tiers = self.tiers
        assert tiers is not None  # the scheduler prefetches only when tiers exist
        rid = seq.request_id
        plan = tiers.plan(seq.token_ids, hit)
        count = seq.num_preemptions == 0 and not seq.tiers_looked_up
        if not plan or self.blocks.allocate(rid, seq.num_tokens, hit) is None:
            if count and not plan:
                seq.tiers_looked_up = True
                tiers.count_lookup(seq.num_tokens - hit.num_tokens)
            return False
        self.blocks.record_prefix_query(seq.num_tokens, hit.num_tokens)
        first = len(hit.block_ids)
        job, load = tiers.start_load(rid, plan, first, self.blocks.block_table(rid)[first:first + len(plan)])
        if count:
            seq.tiers_looked_up = True
            job.count_tokens = seq.num_tokens - hit.num_tokens
        seq.num_computed_tokens = hit.num_tokens
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.waiting[rid] = seq
        self.connector.add(job, load, len(load.dst), job.started, job.started + LOAD_TIMEOUT_S)
        return True

    def settle_load(self, job: TierLoadJob, load, err: Optional[str]) -> None:
        """A tier load ended: requeue its request (at the front) with the blocks that arrived
        computed; the rest of its prompt is computed as usual."""
        assert self.tiers is not None  # tier loads exist only when tiers do
        n = self.tiers.loaded(job, load) if err is None else 0
        if err is not None:
            log.warning("KV tier load of %s failed: %s (computing its prompt)", job.request_id, err)
        if job.count_tokens is not None:
            self.tiers.count_lookup(job.count_tokens, job.tiers[:n])
        seq = self.waiting.pop(job.request_id, None)
        if seq is None:  # aborted meanwhile
            return
        if not self.blocks.has_request(job.request_id):  # its blocks went to quarantine: start afresh
            seq.num_computed_tokens = 0
        else:
            seq.num_computed_tokens = (job.first_block + n) * self.blocks.block_size
            self.blocks.cache_full_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        self.scheduler.add(seq, front=True)
