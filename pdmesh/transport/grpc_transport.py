"""``grpc`` KV transport: blocks streamed over a gRPC server stream (works on CPU and across hosts).

The prefill worker serves ``KVTransfer.Pull`` (``pdmesh.transport.servicer``).  On the decode
worker the network receive stays on the event loop: ``prepare`` opens the stream and a task puts
each checked chunk into an inbox.  Writes into the pool happen only on the engine thread, when the
connector polls the transfer (``GrpcTransfer.poll`` scatters what has arrived), so cancelling is
immediate and certain: once the engine stops polling, nothing writes the blocks any more.
A chunk is a contiguous ``[L, n, 2, bs, Hkv, D]`` gather of ``n`` blocks (one scatter each).
With tensor parallelism there is one stream per source rank read (its whole pool, ``Hkv`` its
local heads); each chunk lands on the destination ranks holding those heads (``KVCachePool.land``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Optional, Sequence

import grpc
import torch

from pdmesh.kv.pool import KVCachePool
from pdmesh.rpc.channels import ChannelPool
from pdmesh.kv.shards import Piece
from pdmesh.transport.base import BaseKVTransport, BaseTransfer, PreparedPull, TransferState, read_ranks, remote_layout
from pdmesh.transport.faults import FaultPlan
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import kv_transfer_pb2 as kpb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc


class _Inbox:
    """Chunks received on the event loop, taken by the engine thread (deque: thread-safe ends)."""

    def __init__(self) -> None:
        self.chunks: collections.deque = collections.deque()
        self.ended = False
        """The stream ended normally (every chunk it will ever send is in ``chunks``)."""
        self.error = ""
        self.task: Optional[asyncio.Task] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def close(self) -> None:
        """Stop receiving (any thread)."""
        if self.task is not None and self.loop is not None and not self.task.done():
            self.loop.call_soon_threadsafe(self.task.cancel)


class GrpcTransfer(BaseTransfer):
    def __init__(self, inboxes: dict[int, _Inbox], heads: dict[int, int], pieces: list[Piece], dst: Sequence[int],
                 pool: KVCachePool, delay: float) -> None:
        self.inboxes = inboxes
        """Source rank -> the chunks of its stream."""
        self.heads = heads
        """Source rank -> KV heads in its pool (a chunk's head axis)."""
        self.pieces = pieces
        self.dst = list(dst)
        self.pool = pool
        self.filled = {r: 0 for r in inboxes}
        self.delay = delay
        self.t0 = time.monotonic()
        self.applied = 0
        self.cancelled = False

    def poll(self) -> TransferState:
        if self.cancelled:
            return TransferState.FAILED
        lay = self.pool.layout
        dtype = getattr(torch, lay.dtype)
        for rank, box in self.inboxes.items():
            while box.chunks:
                if self.delay and time.monotonic() < self.t0 + (self.applied + 1) * self.delay:
                    return TransferState.RUNNING  # fault injection: this chunk lands later
                first, n, data = box.chunks.popleft()
                t = torch.frombuffer(data, dtype=dtype).view(lay.num_layers, n, 2, lay.block_size, self.heads[rank], lay.head_dim)
                self.pool.land(self.pieces, rank, self.dst[first:first + n], t)
                self.filled[rank] += n
                self.nbytes += len(data)
                self.applied += 1
        for box in self.inboxes.values():
            if box.error:
                self.error = box.error
                return TransferState.FAILED
        if all(box.ended for box in self.inboxes.values()):
            missing = sum(len(self.dst) - f for f in self.filled.values())
            if missing:
                self.error = f"KV pull was truncated: {missing} of {len(self.dst) * len(self.filled)} blocks missing"
                return TransferState.FAILED
            return TransferState.DONE
        return TransferState.RUNNING

    def cancel(self) -> bool:
        self.cancelled = True
        for box in self.inboxes.values():
            box.close()
        return True  # only poll() writes, on this thread: nothing writes after this


class GrpcKVTransport(BaseKVTransport):
    name = "grpc"

    def __init__(self, channels: Optional[ChannelPool] = None, faults: Optional[FaultPlan] = None) -> None:
        self.channels = channels or ChannelPool()
        self.faults = faults or FaultPlan()
        """Decode side, tests only: 'delay' makes each chunk land that much later."""

    async def prepare(self, desc: pb.KVDescriptor, src_block_ids: Sequence[int], timeout: float,
                      metadata: tuple = ()) -> PreparedPull:
        delay = self.faults.delay if self.faults.next_pull() == "delay" else 0.0
        src = remote_layout(desc.layout)
        n_blocks = len(src_block_ids)
        inboxes = {}
        for rank in read_ranks(desc.layout):
            inbox = inboxes[rank] = _Inbox()
            inbox.loop = asyncio.get_running_loop()
            if n_blocks == 0:
                inbox.ended = True
                continue
            call = self.channels.stub(desc.address, kgrpc.KVTransferStub).Pull(
                kpb.PullRequest(request_id=desc.request_id, block_ids=list(src_block_ids), rank=rank,
                                lease_token=desc.lease_token, num_tokens=desc.num_tokens, prompt_hash=desc.prompt_hash),
                timeout=timeout, metadata=metadata)
            inbox.task = asyncio.ensure_future(_receive(call, inbox, n_blocks, src.block_bytes, desc.address))

        def close() -> None:
            for box in inboxes.values():
                box.close()

        return PreparedPull(desc, list(src_block_ids), time.monotonic() + timeout, delay=delay,
                            state=(inboxes, src.local_kv_heads), close=close)

    def start(self, prepared: PreparedPull, dst_block_ids: Sequence[int], pool: KVCachePool) -> BaseTransfer:
        pieces = self.check_start(prepared, dst_block_ids, pool)
        inboxes, heads = prepared.state
        return GrpcTransfer(inboxes, {r: heads for r in inboxes}, pieces, dst_block_ids, pool, prepared.delay)

    async def close(self) -> None:
        await self.channels.close()


async def _receive(call, inbox: _Inbox, n_blocks: int, block_bytes: int, address: str) -> None:
    """Event loop: read the stream into the inbox, checking each chunk's shape."""
    try:
        async for chunk in call:
            n, first = chunk.num_blocks, chunk.first_index
            if n <= 0 or first < 0 or first + n > n_blocks or len(chunk.data) != n * block_bytes:
                inbox.error = f"malformed KV chunk (first={first}, blocks={n}, bytes={len(chunk.data)})"
                call.cancel()
                return
            inbox.chunks.append((first, n, bytearray(chunk.data)))
        inbox.ended = True
    except grpc.aio.AioRpcError as exc:
        inbox.error = f"KV pull from {address} failed: {exc.code().name}: {exc.details()}"
    except asyncio.CancelledError:
        call.cancel()
        inbox.error = inbox.error or "cancelled"
