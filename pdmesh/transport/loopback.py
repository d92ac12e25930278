"""An in-process fake transport for tests: copies between two ``KVCachePool`` objects directly
(the source pool is looked up by the descriptor's worker id). Same contract as the real ones."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from pdmesh.kv.pool import KVCachePool
from pdmesh.transport.base import BaseKVTransport, TransferError, TransferResult
from pdmesh.v1 import common_pb2 as pb


class LoopbackTransport(BaseKVTransport):
    name = "loopback"

    def __init__(self, sources: dict[str, KVCachePool]) -> None:
        self.sources = sources

    async def pull(self, desc: pb.KVDescriptor, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                   pool: KVCachePool, timeout: float, metadata: tuple = ()) -> TransferResult:
        if not self._precheck(desc, src_block_ids, dst_block_ids, pool):
            return TransferResult(self.name, 0, 0, 0.0)
        src = self.sources.get(desc.worker_id)
        if src is None:
            raise TransferError(f"unknown source worker {desc.worker_id!r}")
        t0 = time.perf_counter()
        data = src.gather_blocks(torch.tensor(list(src_block_ids), dtype=torch.int64))
        pool.scatter_blocks(torch.tensor(list(dst_block_ids), dtype=torch.int64), data)
        return TransferResult(self.name, data.numel() * data.element_size(), len(dst_block_ids), time.perf_counter() - t0)
