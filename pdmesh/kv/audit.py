"""KV content audit (``--kv-audit``; for tests): catches KV that changes under its owner.

Block counts cannot show a block written by someone who no longer owns it (a late transfer
write into blocks that were freed and handed to another request).  The audit checksums what
must never change: the KV of a request's prompt tokens, from the moment it is complete (computed
here, or pulled and activated) until the blocks are freed.  Each block gets its own checksum over
the slots of prompt tokens only (decode tokens go on filling the last block).  At free time the
checksums are computed again; any difference is a *mismatch* (counted, logged).

Prefill workers also put the checksums of the blocks they hand over into the KV descriptor; the
decode worker compares what it received with them when the pull completes, so a source block
that changed under a reader shows up as well.

Engine thread only (it reads the pool).  Cost: one hash of the prompt's KV at each end, so it is
off by default.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import torch

from pdmesh.kv.pool import KVCachePool

log = logging.getLogger(__name__)


def block_checksums(pool: KVCachePool, block_ids: Sequence[int], num_tokens: int) -> list[int]:
    """One 64-bit checksum per block of ``block_ids`` (in token order) over the slots of the first
    ``num_tokens`` tokens (all layers, K and V, every KV head once: the same on any TP layout, so a
    decode worker of another TP size compares what it pulled with the source's checksums)."""
    bs = pool.block_size
    out = []
    for j, b in enumerate(block_ids):
        slots = min(bs, num_tokens - j * bs)
        if slots <= 0:
            break
        data = pool.logical_block(b, slots)
        out.append(int.from_bytes(hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=8).digest(), "little"))
    return out


class KVAudit:
    def __init__(self, pool: KVCachePool) -> None:
        self.pool = pool
        self.records: dict[str, tuple[list[int], int, list[int]]] = {}
        """request id -> (its blocks, prompt tokens, their checksums)."""
        self.mismatches = 0
        """Blocks whose prompt KV changed while owned, or arrived different from the source (counter)."""
        self.checked = 0
        """Blocks verified so far (counter)."""

    def record(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> list[int]:
        """The request's prompt KV is complete: remember its checksums (first time only)."""
        if request_id not in self.records:
            ids = list(block_ids[:-(-num_tokens // self.pool.block_size)])
            self.records[request_id] = (ids, num_tokens, block_checksums(self.pool, ids, num_tokens))
        return self.records[request_id][2]

    def compare(self, request_id: str, got: Sequence[int], want: Sequence[int], what: str) -> None:
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        self.checked += len(want)
        if bad or len(got) != len(want):
            self.mismatches += max(1, len(bad))
            log.error("KV audit: %s of request %s differ in blocks %s", what, request_id, bad or "(count)")

    def expect(self, request_id: str, block_ids: Sequence[int], num_tokens: int, first: int, want: Sequence[int]) -> None:
        """Pulled KV landed: blocks ``first:`` of the request must equal the source's checksums."""
        got = self.record(request_id, block_ids, num_tokens)
        if want:
            self.compare(request_id, got[first:], list(want)[first:], "pulled blocks")

    def verify(self, request_id: str) -> None:
        """The request's blocks are about to be freed: its prompt KV must be as recorded."""
        rec = self.records.pop(request_id, None)
        if rec is None:
            return
        ids, n, want = rec
        self.compare(request_id, block_checksums(self.pool, ids, n), want, "prompt KV")

    def forget(self, request_id: str) -> None:
        """The blocks are freed without their KV mattering (a pull that did not complete)."""
        self.records.pop(request_id, None)
