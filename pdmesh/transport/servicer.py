"""Prefill side of every transport: ``KVTransfer`` serves the held KV.

* ``Pull`` streams a request's blocks of one tensor-parallel rank's pool (the ``grpc`` transport;
  rank 0 maps every rank's pool) under a stream pin on its lease, all of it under the lease's hard
  limit (a reader that stops reading is cut off there).
* ``GetIpcHandle`` / ``GetNixlMetadata`` tell one-sided readers (``cuda_ipc``, ``nixl``) where the
  pool is, once per peer process (both carry this process's incarnation).
* ``BeginRead`` / ``EndRead`` pin the lease around a one-sided read (see ``LeaseTable``).  A nixl
  reader may ask for the blocks staged (``stage``): under the pin, each source rank's blocks are
  packed by one gather (in a thread: GPU work never runs on the loop) into one extent of this
  worker's staging arena, which then belongs to the lease and is freed when it ends
  (``pdmesh.transport.staging``).
* Pull, BeginRead and EndRead present the lease's token (``pdmesh.transport.capability``): Pull and
  BeginRead for the lease's prompt, by its holder; EndRead (which releases) by its holder.  Blocks
  are packed only for a reader that passed that check.

``faults`` (``--inject-kv-faults``, tests only) may corrupt or slow the pulls served here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Optional

import grpc
import torch

from pdmesh.kv.pool import KVCachePool
from pdmesh.metrics import ServiceMetrics
from pdmesh.rpc.authz import caller
from pdmesh.transport.base import TransferError
from pdmesh.transport.capability import authorize_pull, authorize_release
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.lease import LeaseTable
from pdmesh.v1 import kv_transfer_pb2 as kpb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc

if TYPE_CHECKING:
    from pdmesh.transport.nixl import NixlAgent

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20


def blocks_per_chunk(block_bytes: int) -> int:
    """Blocks in one chunk of a ``Pull`` stream (also the piece size of slowed one-sided pulls)."""
    return max(1, CHUNK_BYTES // max(1, block_bytes))


class KVTransferServicer(kgrpc.KVTransferServicer):
    def __init__(self, pool: KVCachePool, leases: LeaseTable, incarnation: str = "",
                 faults: Optional[FaultPlan] = None, metrics: Optional[ServiceMetrics] = None,
                 nixl: Optional["NixlAgent"] = None) -> None:
        self.metrics = metrics
        self.pool = pool
        self.incarnation = incarnation
        self.leases = leases
        self.faults = faults or FaultPlan()
        self.per_chunk = blocks_per_chunk(pool.layout.block_bytes)
        self.nixl = nixl
        """This worker's ``NixlAgent`` when it offers nixl (metadata, staging arena)."""

    async def Pull(self, request: kpb.PullRequest, context: grpc.aio.ServicerContext) -> None:
        """Streams the blocks of rank ``request.rank``'s pool (``context.write``) under a stream pin,
        for the lease token's holder and the lease's prompt only; the whole pull runs under the
        lease's hard limit, so a reader that stops reading cannot keep the blocks pinned past it."""
        if not 0 <= request.rank < len(self.pool.ranks):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no tensor-parallel rank {request.rank} here")
        lease = self.leases.pin(request.request_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV held for request {request.request_id!r} (released or expired)")
        assert lease is not None  # context.abort raised otherwise
        try:
            refused = authorize_pull(lease, request.lease_token, request.num_tokens, request.prompt_hash, str(caller()))
            if refused:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"pull of {request.request_id!r}: {refused}")
            ids = list(request.block_ids)
            if not set(ids) <= set(lease.block_ids):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "requested blocks are not held for this request")
            try:
                async with asyncio.timeout(lease.hard_deadline - time.monotonic()):
                    await self._serve(request.rank, ids, context)
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the KV lease reached its hard limit (--kv-lease-max-seconds)")
        finally:
            self.leases.unpin(request.request_id)

    async def _serve(self, rank: int, ids: list[int], context: grpc.aio.ServicerContext) -> None:
        mode = self.faults.next_pull()
        if mode and mode != "delay" and self.metrics is not None:
            self.metrics.inc("kv_transfer_faults_injected_total", mode=mode)
        if mode == "fail":
            await context.abort(grpc.StatusCode.INTERNAL, "injected transfer failure")
        starts = list(range(0, len(ids), self.per_chunk))
        if mode == "truncate" and starts:
            starts = starts[:-1]
        for start in starts:
            if mode == "delay":
                await asyncio.sleep(self.faults.delay)
            chunk = ids[start:start + self.per_chunk]
            data = await asyncio.to_thread(self._read, rank, chunk)
            await context.write(kpb.KVChunk(first_index=start, num_blocks=len(chunk), data=data))

    async def BeginRead(self, request: kpb.BeginReadRequest, context: grpc.aio.ServicerContext) -> kpb.BeginReadResponse:
        lease = self.leases.get(request.request_id)
        if lease is not None:
            refused = authorize_pull(lease, request.lease_token, request.num_tokens, request.prompt_hash, str(caller()))
            if refused:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"read of {request.request_id!r}: {refused}")
            if not set(request.block_ids) <= set(lease.block_ids):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "requested blocks are not held for this request")
        got = self.leases.begin_read(request.request_id, max(0.0, request.max_seconds))
        if got is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV held for request {request.request_id!r} (released or expired)")
        assert got is not None  # context.abort raised otherwise
        read_id, granted = got
        staged = await self._stage(request) if request.stage and request.block_ids else None
        return kpb.BeginReadResponse(read_id=read_id, granted_seconds=granted, staged=staged)

    async def _stage(self, request: kpb.BeginReadRequest) -> Optional[kpb.NixlStagedRegion]:
        """Pack the pinned blocks of every rank a reader reads into a staging extent, owned by this
        call while the gathers write it, then by the lease.  None (the reader reads block by block):
        no arena here, the arena is full (counted), or the lease ended during the gather (its pin
        ran out)."""
        agent = self.nixl
        if agent is None or agent.arena is None:
            return None
        arena = agent.arena
        ids = list(request.block_ids)
        ext = arena.alloc(agent.staged_bytes(len(ids)))
        if ext is None:
            if self.metrics is not None:
                self.metrics.inc("kv_nixl_staging_fallbacks_total", side="source")
            log.info("NIXL staging arena full (%d of %d bytes in use): %s read block by block",
                     arena.used_bytes, arena.capacity, request.request_id)
            return None
        gather = asyncio.ensure_future(asyncio.to_thread(agent.pack, ext, ids))
        try:
            await asyncio.shield(gather)
        except asyncio.CancelledError:  # the caller went away: free the extent once the gather stopped
            gather.add_done_callback(lambda _: arena.free(ext))
            raise
        except Exception:  # noqa: BLE001 - the gather failed (and stopped): read block by block
            log.exception("packing %s for a staged NIXL read failed", request.request_id)
            arena.free(ext)
            return None
        if not self.leases.attach(request.request_id, lambda: arena.free(ext)):
            arena.free(ext)
            return None
        return agent.staged_region(ext, len(ids))

    async def EndRead(self, request: kpb.EndReadRequest, context: grpc.aio.ServicerContext) -> kpb.EndReadResponse:
        lease = self.leases.get(request.request_id)
        if lease is not None:
            refused = authorize_release(lease, request.lease_token, str(caller()), None)
            if refused:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"end of read of {request.request_id!r}: {refused}")
        return kpb.EndReadResponse(found=self.leases.end_read(request.request_id, request.read_id))

    async def GetIpcHandle(self, request: kpb.IpcHandleRequest, context: grpc.aio.ServicerContext) -> kpb.CudaIpcHandle:
        from pdmesh.transport.cuda_ipc import export_handle

        try:
            return export_handle(self.pool, self.incarnation, request.rank)
        except TransferError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            raise AssertionError("unreachable: context.abort raises") from exc

    async def GetNixlMetadata(self, request: kpb.NixlMetadataRequest, context: grpc.aio.ServicerContext) -> kpb.NixlMetadata:
        if self.nixl is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker does not offer the nixl transport")
        assert self.nixl is not None  # context.abort raised otherwise
        return self.nixl.metadata()

    def _read(self, rank: int, block_ids: list[int]) -> bytes:
        t = self.pool.read_heads(rank, block_ids)
        return t.cpu().contiguous().view(torch.uint8).numpy().tobytes()
