"""``cuda_ipc`` KV transport: same host, one or two GPUs, no bytes through the CPU.

The prefill worker exports the CUDA IPC handle of its whole KV pool once
(``KVTransfer.GetIpcHandle``).  The decode worker opens each peer's handle once per peer process
(cached by address and incarnation: a restarted prefill has a new incarnation, so a stale handle is
never used) and pulls a request's blocks with one gather on the source GPU, one device-to-device
copy (peer access across GPUs) and one scatter into its pool, for all layers at once, on a side
stream, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

import grpc
import torch

from pdmesh.kv.copy import copy_blocks
from pdmesh.kv.pool import KVCachePool
from pdmesh.rpc.channels import ChannelPool
from pdmesh.transport.base import BaseKVTransport, TransferError, TransferResult
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import kv_transfer_pb2 as kpb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc

log = logging.getLogger(__name__)


def export_handle(pool: KVCachePool, incarnation: str) -> kpb.CudaIpcHandle:
    """Prefill side: the IPC handle of the pool's storage."""
    if pool.kv.device.type != "cuda":
        raise TransferError("the KV pool is not on a GPU")
    (device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = pool.kv.untyped_storage()._share_cuda_()
    return kpb.CudaIpcHandle(device=device, handle=handle, storage_size_bytes=size, storage_offset_bytes=offset,
                             ref_counter_handle=rc_handle, ref_counter_offset=rc_offset, event_handle=ev_handle or b"",
                             event_sync_required=ev_sync, shape=list(pool.kv.shape),
                             dtype=str(pool.kv.dtype).removeprefix("torch."), incarnation=incarnation)


def open_handle(h: kpb.CudaIpcHandle) -> torch.Tensor:
    """Decode side: a tensor viewing the peer's pool (costs milliseconds: do it once per peer)."""
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        h.device, h.handle, h.storage_size_bytes, h.storage_offset_bytes, h.ref_counter_handle,
        h.ref_counter_offset, h.event_handle or None, h.event_sync_required)
    t = torch.empty(0, dtype=getattr(torch, h.dtype), device=f"cuda:{h.device}")
    t.set_(storage, 0, tuple(h.shape))
    return t


class CudaIpcTransport(BaseKVTransport):
    name = "cuda_ipc"

    def __init__(self, channels: ChannelPool, device: torch.device) -> None:
        self.channels = channels
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._src_stream = None
        self.peers: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = asyncio.Lock()

    async def _peer(self, desc: pb.KVDescriptor, timeout: float, metadata: tuple = ()) -> torch.Tensor:
        key = (desc.address, desc.incarnation)
        remote = self.peers.get(key)
        if remote is not None:
            return remote
        async with self._lock:
            if key in self.peers:
                return self.peers[key]
            try:
                h = await self.channels.stub(desc.address, kgrpc.KVTransferStub).GetIpcHandle(
                    kpb.IpcHandleRequest(), timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                raise TransferError(f"no IPC handle from {desc.address}: {exc.code().name}: {exc.details()}") from exc
            if h.incarnation != desc.incarnation:
                raise TransferError(f"stale descriptor: {desc.address} restarted (incarnation {h.incarnation} != {desc.incarnation})")
            for old in [k for k in self.peers if k[0] == desc.address]:
                del self.peers[old]  # that process is gone
            t0 = time.perf_counter()
            remote = await asyncio.to_thread(open_handle, h)
            log.info("opened CUDA IPC handle of %s (%s) in %.1f ms", desc.address, desc.incarnation, (time.perf_counter() - t0) * 1e3)
            self.peers[key] = remote
            return remote

    def _copy(self, remote: torch.Tensor, src: Sequence[int], dst: Sequence[int], pool: KVCachePool) -> int:
        """Same GPU: one block-copy kernel, peer pool -> local pool.  Two GPUs: gather into a
        contiguous buffer on the source GPU, one peer-to-peer copy, scatter on the destination."""
        n = len(src)
        local = pool.kv
        nbytes = n * local[:, :1].numel() * local.element_size()
        if remote.device == local.device:
            with torch.cuda.stream(self.stream):
                idx = torch.tensor([list(src), list(dst)], dtype=torch.int64).to(local.device)  # one H2D copy
                copy_blocks(remote, idx[0], local, idx[1])
            self.stream.synchronize()
            return nbytes
        src_stream = torch.cuda.Stream(remote.device) if self._src_stream is None else self._src_stream
        self._src_stream = src_stream
        shape = (remote.shape[0], n) + tuple(remote.shape[2:])
        with torch.cuda.device(remote.device), torch.cuda.stream(src_stream):
            s_idx = torch.tensor(list(src), dtype=torch.int64).to(remote.device, non_blocking=True)
            staged = torch.empty(shape, dtype=remote.dtype, device=remote.device)
            copy_blocks(remote, s_idx, staged, torch.arange(n, device=remote.device))
        src_stream.synchronize()
        with torch.cuda.stream(self.stream):
            moved = staged.to(local.device, non_blocking=True)
            d_idx = torch.tensor(list(dst), dtype=torch.int64).to(local.device, non_blocking=True)
            copy_blocks(moved, torch.arange(n, device=local.device), local, d_idx)
        self.stream.synchronize()
        return nbytes

    async def pull(self, desc: pb.KVDescriptor, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                   pool: KVCachePool, timeout: float, metadata: tuple = ()) -> TransferResult:
        if not self._precheck(desc, src_block_ids, dst_block_ids, pool):
            return TransferResult(self.name, 0, 0, 0.0)
        t0 = time.perf_counter()
        remote = await self._peer(desc, timeout, metadata)
        if max(src_block_ids) >= remote.shape[1]:
            raise TransferError("source block id outside the peer's pool")
        try:
            nbytes = await asyncio.wait_for(asyncio.to_thread(self._copy, remote, src_block_ids, dst_block_ids, pool), timeout)
        except asyncio.TimeoutError as exc:
            raise TransferError(f"cuda_ipc pull timed out after {timeout}s") from exc
        except RuntimeError as exc:
            self.peers.pop((desc.address, desc.incarnation), None)
            raise TransferError(f"cuda_ipc copy failed: {exc}") from exc
        return TransferResult(self.name, nbytes, len(dst_block_ids), time.perf_counter() - t0)

    def pull_blocking(self, remote: torch.Tensor, src: Sequence[int], dst: Sequence[int], pool: KVCachePool) -> int:
        """The copy alone, for benchmarks (handle already open)."""
        return self._copy(remote, src, dst, pool)

