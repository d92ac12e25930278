"""An in-process fake transport for tests: copies between two ``KVCachePool`` objects directly
(the source pool is looked up by the descriptor's worker id). Same contract as the real ones:
``start`` copies at once (or, slowed by ``delay``, piece by piece as the connector polls)."""

from __future__ import annotations

import time
from typing import Sequence

from pdmesh.kv.pool import KVCachePool
from pdmesh.transport.base import (BaseKVTransport, BaseTransfer, DoneTransfer, PacedTransfer, PreparedPull, TransferError,
                                   read_ranks)
from pdmesh.transport.servicer import blocks_per_chunk
from pdmesh.v1 import common_pb2 as pb


class LoopbackTransport(BaseKVTransport):
    name = "loopback"

    def __init__(self, sources: dict[str, KVCachePool], delay: float = 0.0) -> None:
        self.sources = sources
        self.delay = delay
        """Seconds between pieces landing (0: one synchronous copy)."""

    async def prepare(self, desc: pb.KVDescriptor, src_block_ids: Sequence[int], timeout: float,
                      metadata: tuple = ()) -> PreparedPull:
        src = self.sources.get(desc.worker_id)
        if src is None:
            raise TransferError(f"unknown source worker {desc.worker_id!r}")
        return PreparedPull(desc, list(src_block_ids), time.monotonic() + timeout, delay=self.delay, state=src)

    def start(self, prepared: PreparedPull, dst_block_ids: Sequence[int], pool: KVCachePool) -> BaseTransfer:
        pieces = self.check_start(prepared, dst_block_ids, pool)
        src: KVCachePool = prepared.state
        s, d = list(prepared.src_block_ids), list(dst_block_ids)

        def copy(a: int, b: int) -> BaseTransfer:
            nbytes = 0
            for rank in read_ranks(prepared.desc.layout):
                data = src.read_heads(rank, s[a:b])
                pool.land(pieces, rank, d[a:b], data)
                nbytes += data.numel() * data.element_size()
            return DoneTransfer(nbytes)

        if prepared.delay:
            return PacedTransfer(copy, len(s), blocks_per_chunk(pool.layout.block_bytes), prepared.delay)
        return copy(0, len(s))
