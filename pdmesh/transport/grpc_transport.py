"""``grpc`` KV transport: blocks streamed over a gRPC server stream (works on CPU and across hosts).

The prefill worker serves ``KVTransfer.Pull`` (``KVTransferServicer``); the decode worker's
``GrpcKVTransport`` calls it and scatters each chunk into its pool.  A chunk is a contiguous
``[L, n, 2, bs, Hkv, D]`` gather of ``n`` blocks for all layers (one gather, one scatter).
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional, Sequence

import grpc
import torch

from pdmesh.kv.pool import KVCachePool
from pdmesh.metrics import ServiceMetrics
from pdmesh.rpc.authz import caller
from pdmesh.rpc.channels import ChannelPool
from pdmesh.transport.base import BaseKVTransport, TransferError, TransferResult
from pdmesh.transport.capability import authorize_pull
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.lease import LeaseTable
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import kv_transfer_pb2 as kpb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc

CHUNK_BYTES = 4 << 20


def blocks_per_chunk(block_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, block_bytes))


class KVTransferServicer(kgrpc.KVTransferServicer):
    """Prefill side. ``faults`` (``--inject-kv-faults``, tests only) may corrupt pulls."""

    def __init__(self, pool: KVCachePool, leases: LeaseTable, incarnation: str = "",
                 faults: Optional[FaultPlan] = None, metrics: Optional[ServiceMetrics] = None) -> None:
        self.metrics = metrics
        self.pool = pool
        self.incarnation = incarnation
        self.leases = leases
        self.faults = faults or FaultPlan()
        self.per_chunk = blocks_per_chunk(pool.layout.block_bytes)

    async def Pull(self, request: kpb.PullRequest, context: grpc.aio.ServicerContext) -> None:
        """Streams the blocks (``context.write``) under the lease's pin; the whole pull runs under
        the lease's hard deadline, so a reader that stops reading cannot keep the blocks pinned."""
        lease = self.leases.pin(request.request_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV held for request {request.request_id!r} (released or expired)")
        try:
            refused = authorize_pull(lease, request.lease_token, request.num_tokens, request.prompt_hash, str(caller()))
            if refused:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"pull of {request.request_id!r}: {refused}")
            ids = list(request.block_ids)
            if not set(ids) <= set(lease.block_ids):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "requested blocks are not held for this request")
            try:
                async with asyncio.timeout(lease.hard_deadline - time.monotonic()):
                    await self._serve(ids, context)
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the KV lease reached its hard limit (--kv-lease-max-seconds)")
        finally:
            self.leases.unpin(request.request_id)

    async def _serve(self, ids: list[int], context: grpc.aio.ServicerContext) -> None:
        mode = self.faults.next_pull()
        if mode and self.metrics is not None:
            self.metrics.inc("kv_transfer_faults_injected_total", mode=mode)
        if mode == "fail":
            await context.abort(grpc.StatusCode.INTERNAL, "injected transfer failure")
        starts = list(range(0, len(ids), self.per_chunk))
        if mode == "truncate" and starts:
            starts = starts[:-1]
        for start in starts:
            if self.faults.delay:
                await asyncio.sleep(self.faults.delay)
            chunk = ids[start:start + self.per_chunk]
            data = await asyncio.to_thread(self._read, chunk)
            await context.write(kpb.KVChunk(first_index=start, num_blocks=len(chunk), data=data))

    async def GetIpcHandle(self, request: kpb.IpcHandleRequest, context: grpc.aio.ServicerContext) -> kpb.CudaIpcHandle:
        from pdmesh.transport.cuda_ipc import export_handle

        try:
            return export_handle(self.pool, self.incarnation)
        except TransferError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    def _read(self, block_ids: list[int]) -> bytes:
        t = self.pool.gather_blocks(torch.tensor(block_ids, dtype=torch.int64))
        return t.cpu().contiguous().view(torch.uint8).numpy().tobytes()


class GrpcKVTransport(BaseKVTransport):
    name = "grpc"

    def __init__(self, channels: Optional[ChannelPool] = None) -> None:
        self.channels = channels or ChannelPool()

    async def pull(self, desc: pb.KVDescriptor, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                   pool: KVCachePool, timeout: float, metadata: tuple = ()) -> TransferResult:
        if not self._precheck(desc, src_block_ids, dst_block_ids, pool):
            return TransferResult(self.name, 0, 0, 0.0)
        t0 = time.perf_counter()
        stub = self.channels.stub(desc.address, kgrpc.KVTransferStub)
        lay = pool.layout
        dtype = getattr(torch, lay.dtype)
        shape_tail = (2, lay.block_size, lay.num_kv_heads, lay.head_dim)
        block_bytes = lay.block_bytes
        filled = [False] * len(dst_block_ids)
        total = 0
        try:
            call = stub.Pull(kpb.PullRequest(request_id=desc.request_id, block_ids=list(src_block_ids),
                                             lease_token=desc.lease_token, num_tokens=desc.num_tokens,
                                             prompt_hash=desc.prompt_hash), timeout=timeout, metadata=metadata)
            async for chunk in call:
                n, first = chunk.num_blocks, chunk.first_index
                if n <= 0 or first < 0 or first + n > len(dst_block_ids) or len(chunk.data) != n * block_bytes:
                    raise TransferError(f"malformed KV chunk (first={first}, blocks={n}, bytes={len(chunk.data)})")
                data = torch.frombuffer(bytearray(chunk.data), dtype=dtype).view(lay.num_layers, n, *shape_tail)
                dst = torch.tensor(dst_block_ids[first:first + n], dtype=torch.int64)
                await asyncio.to_thread(pool.scatter_blocks, dst, data)
                for i in range(first, first + n):
                    filled[i] = True
                total += len(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise TransferError(f"KV pull from {desc.address} failed: {exc.code().name}: {exc.details()}") from exc
        if not all(filled):
            raise TransferError(f"KV pull from {desc.address} was truncated: {filled.count(False)} of {len(filled)} blocks missing")
        return TransferResult(self.name, total, len(dst_block_ids), time.perf_counter() - t0)

    async def close(self) -> None:
        await self.channels.close()
