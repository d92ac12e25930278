"""Paged KV block manager with reference counts and automatic prefix caching.

Pure Python (no tensors): it hands out block ids; ``pdmesh.kv.pool`` holds the tensors.  A
request's table is also kept as a numpy array for the model runner (rebuilt when it changes).

Algorithm
---------
* Blocks ``0..N-1`` start in the free queue in id order; allocation pops from the front.
* A block that becomes full of computed tokens gets a content hash chained from the request's
  first block: ``h_i = H(h_{i-1} || tokens of block i)``; ``hash -> block`` is recorded.
* A new request first looks up the longest chain of cached full blocks of its tokens (never all
  of its tokens: the last one is always recomputed so that there are logits to sample from); those
  blocks are shared (ref count + 1) instead of recomputed.
* Freeing decrements ref counts, walking a request's blocks from last to first.  A block whose
  count drops to 0 goes back to the free queue: to the *front* if it holds nothing reusable (no
  hash), to the *back* if it is cached.  So cached blocks are evicted least-recently-freed first,
  and within one request its tail before its head.
* Popping a cached block from the free queue for reuse evicts it (its hash is forgotten).
* With lower KV tiers (``pdmesh.engine.offload``), every cached block whose ref count drops to 0
  is also recorded in ``released`` (block, hash) for the engine to copy down to the host tier
  while it is still on the device; ``pin`` holds blocks under an extra owner while a copy reads
  them.  ``on_cache_event(hash, added)`` hears every hash entering or leaving ``cached`` (the
  worker publishes them for routing by cached prefix).

Invariants (checked by ``check_invariants``)
--------------------------------------------
* A block is in the free queue iff its ref count is 0.
* ``cached[h] == b`` iff ``block_hash[b] == h``.
* Every block of every live request has ref count >= 1; ref count = number of live requests
  holding it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np


def hash_block(parent: Optional[bytes], tokens: Sequence[int]) -> bytes:
    """Content hash of one full block, chained from its parent block's hash."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass
class _Request:
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    """Hashes of this request's leading full blocks that have been cached (len <= len(blocks))."""
    array: Optional[np.ndarray] = None
    """``blocks`` as int32, as of its length then (rebuilt when the length changes)."""


@dataclass(frozen=True)
class PrefixHit:
    """Result of a prefix-cache lookup: shared blocks and the tokens they cover."""

    block_ids: tuple[int, ...]
    num_tokens: int
    hashes: tuple[bytes, ...]


class PrefixCachingBlockManager:
    """Owns block ids for requests (keyed by request id). Not thread-safe: one owner thread."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[Optional[bytes]] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.requests: dict[str, _Request] = {}
        self.prefix_queries = 0
        """Tokens looked up in the prefix cache (counter)."""
        self.prefix_hits = 0
        """Tokens found in the prefix cache (counter)."""
        self.released: Optional[list[tuple[int, bytes]]] = None
        """When a list (lower tiers on): cached blocks whose ref count dropped to 0, in order, for the
        engine to drain."""
        self.on_cache_event: Optional[Callable[[bytes, bool], None]] = None
        """Called with (hash, True) when a block is cached under ``hash``, (hash, False) when it is evicted."""

    # ---------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (cached ones included: they are evictable)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self.requests[request_id].blocks

    def block_table_array(self, request_id: str) -> np.ndarray:
        """[len(block_table)] int32: the request's block table as an array (cached; the runner
        builds attention page tables from it without converting lists every step)."""
        req = self.requests[request_id]
        if req.array is None or len(req.array) != len(req.blocks):
            req.array = np.asarray(req.blocks, dtype=np.int32)
        return req.array

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- prefix cache
    def lookup_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        """Longest chain of cached full blocks of ``token_ids`` (capped below len(token_ids))."""
        if not self.enable_prefix_caching:
            return PrefixHit((), 0, ())
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent: Optional[bytes] = None
        for i in range(max_blocks):
            h = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            b = self.cached.get(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
            parent = h
        return PrefixHit(tuple(blocks), len(blocks) * bs, tuple(hashes))

    def record_prefix_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    # ---------------------------------------------------------------- allocation
    def can_allocate(self, request_id: str, num_total_tokens: int, hit: Optional[PrefixHit] = None) -> bool:
        req = self.requests.get(request_id)
        have = len(req.blocks) if req else 0
        shared = 0
        if hit is not None and req is None:
            have = len(hit.block_ids)
            shared = sum(1 for b in hit.block_ids if self.ref_count[b] == 0)
        return self.blocks_needed(num_total_tokens) - have + shared <= self.num_free_blocks

    def allocate(self, request_id: str, num_total_tokens: int, hit: Optional[PrefixHit] = None) -> Optional[list[int]]:
        """Make ``request_id`` hold enough blocks for ``num_total_tokens`` tokens.

        On a request's first allocation ``hit`` (from ``lookup_prefix``) supplies shared blocks.
        Returns the new block ids appended (fresh ones only), or None, changing nothing, when
        there are not enough free blocks.
        """
        req = self.requests.get(request_id)
        if req is not None and len(req.blocks) * self.block_size >= num_total_tokens:
            return []  # the common decode case: its blocks already cover it
        if not self.can_allocate(request_id, num_total_tokens, hit):
            return None
        if req is None:
            req = self.requests[request_id] = _Request()
            if hit is not None:
                for b, h in zip(hit.block_ids, hit.hashes):
                    self._incref(b)
                    req.blocks.append(b)
                    req.hashes.append(h)
        fresh = []
        for _ in range(self.blocks_needed(num_total_tokens) - len(req.blocks)):
            b = self._pop_free()
            self.ref_count[b] = 1
            req.blocks.append(b)
            fresh.append(b)
        return fresh

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register hashes of the request's blocks that are full within ``num_computed_tokens``."""
        if not self.enable_prefix_caching:
            return
        req = self.requests[request_id]
        bs = self.block_size
        full = min(num_computed_tokens // bs, len(req.blocks))
        if full <= len(req.hashes):
            return
        parent = req.hashes[-1] if req.hashes else None
        for i in range(len(req.hashes), full):
            h = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            b = req.blocks[i]
            if h not in self.cached and self.block_hash[b] is None:
                self.cached[h] = b
                self.block_hash[b] = h
                if self.on_cache_event is not None:
                    self.on_cache_event(h, True)
            req.hashes.append(h)
            parent = h

    def free(self, request_id: str) -> int:
        """Release every block of the request; returns how many it held. Unknown ids: 0."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return 0
        for b in reversed(req.blocks):
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"block {b} ref count underflow"
            if self.ref_count[b] == 0:
                self.free_queue[b] = None
                h = self.block_hash[b]
                if h is None:
                    self.free_queue.move_to_end(b, last=False)
                elif self.released is not None:
                    self.released.append((b, h))
        return len(req.blocks)

    def trim(self, request_id: str, num_tokens: int) -> list[int]:
        """Free the request's trailing blocks beyond those covering ``num_tokens`` tokens (KV slots
        of rejected speculative tokens); returns the freed ids.  Only blocks held by this request
        alone and never cached can be trailing: a shared or hashed block holds computed tokens."""
        req = self.requests[request_id]
        keep = self.blocks_needed(num_tokens)
        freed = req.blocks[keep:]
        if not freed:
            return []
        for b in reversed(freed):
            assert self.ref_count[b] == 1 and self.block_hash[b] is None, f"trimmed block {b} is shared or cached"
            self.ref_count[b] = 0
            self.free_queue[b] = None
            self.free_queue.move_to_end(b, last=False)
        del req.blocks[keep:]
        del req.hashes[keep:]
        req.array = None
        return freed

    def pin(self, owner: str, block_ids: Sequence[int]) -> None:
        """Make ``owner`` (a fresh id) hold ``block_ids`` too (ref count + 1 each; a free block
        leaves the free queue, keeping its hash): a copy out of the pool reads them meanwhile.
        ``free(owner)`` lets go."""
        if owner in self.requests:
            raise ValueError(f"{owner!r} already holds blocks")
        req = self.requests[owner] = _Request()
        for b in block_ids:
            self._incref(b)
            req.blocks.append(b)

    def reset(self) -> None:
        """Forget every cached block and the counters, as a new manager (block ids are handed out
        from 0 again); only while no request holds blocks (after a warm-up)."""
        if self.requests:
            raise RuntimeError(f"cannot reset: {len(self.requests)} requests hold blocks")
        self.ref_count = [0] * self.num_blocks
        self.block_hash = [None] * self.num_blocks
        self.free_queue = OrderedDict((b, None) for b in range(self.num_blocks))
        if self.on_cache_event is not None:
            for h in self.cached:
                self.on_cache_event(h, False)
        self.cached = {}
        self.prefix_queries = self.prefix_hits = 0
        if self.released is not None:
            self.released = []

    def reassign(self, request_id: str, new_owner: str) -> None:
        """Hand every block of ``request_id`` to ``new_owner`` (a fresh id), ref counts unchanged:
        the KV connector keeps blocks that a stopped transfer may still write this way."""
        if new_owner in self.requests:
            raise ValueError(f"{new_owner!r} already holds blocks")
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.requests[new_owner] = req

    # ---------------------------------------------------------------- internals
    def _incref(self, b: int) -> None:
        if self.ref_count[b] == 0:
            del self.free_queue[b]
        self.ref_count[b] += 1

    def _pop_free(self) -> int:
        b, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[b]
        if h is not None:
            if self.cached.get(h) == b:
                del self.cached[h]
                if self.on_cache_event is not None:
                    self.on_cache_event(h, False)
            self.block_hash[b] = None
        return b

    def check_invariants(self) -> None:
        counts = [0] * self.num_blocks
        for req in self.requests.values():
            for b in req.blocks:
                counts[b] += 1
        assert counts == self.ref_count, "ref counts disagree with live requests"
        for b in range(self.num_blocks):
            assert (b in self.free_queue) == (self.ref_count[b] == 0), f"block {b} free-queue mismatch"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
