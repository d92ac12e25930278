"""``cuda_ipc`` KV transport: same host, one or two GPUs, no bytes through the CPU.

The prefill worker exports the CUDA IPC handle of its whole KV pool once
(``KVTransfer.GetIpcHandle``).  The decode worker opens each peer's handle once per peer process
(cached by address and incarnation: a restarted prefill has a new incarnation, so a stale handle is
never used).  A pull is one-sided: ``prepare`` (event loop) pins the source lease (``BeginRead``);
``start`` (the engine thread, between steps) launches the copy on a side stream of the worker's
device and records a CUDA event; the connector polls ``event.query()``.  No thread, no blocking
synchronize.  On one GPU the copy is one block-copy kernel; across two it is a gather into a
contiguous buffer on the source GPU, one peer-to-peer copy and a scatter on the destination.

Devices are always explicit (``torch.cuda.device(...)``, ``torch.cuda.Stream(device)``): the engine
thread's current device need not be the worker's.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from pdmesh.kv.copy import copy_blocks
from pdmesh.kv.pool import KVCachePool
from pdmesh.rpc.channels import ChannelPool
from pdmesh.transport.base import BaseTransfer, TransferError, TransferState
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.one_sided import OneSidedTransport
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


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream of the highest priority on ``device``: the GPU's block scheduler dispatches its
    kernels before those of normal-priority streams (a busy prefill's GEMMs, a decode step's), so a
    pull under load is not queued behind them."""
    high, _ = torch.cuda.Stream.priority_range()  # (greatest, least): lower numbers are higher priority
    return torch.cuda.Stream(device, priority=high)


def _ids(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Block ids on ``device`` through pinned memory, on the current stream (no host sync)."""
    return torch.tensor(list(ids), dtype=torch.int64).pin_memory().to(device, non_blocking=True)


class CudaCopy(BaseTransfer):
    """A launched copy: done when its event has fired.  A kernel cannot be recalled, so ``cancel``
    reports stopped only once it has run.  ``begin`` (recorded before the copy on the stream that
    runs first) and ``event`` time it on the GPU."""

    def __init__(self, event: torch.cuda.Event, nbytes: int, keep: tuple, begin: Optional[torch.cuda.Event] = None) -> None:
        self.event = event
        self.begin = begin
        self.nbytes = nbytes
        self._keep = keep  # tensors the queued work uses, alive until it ran

    def device_seconds(self) -> Optional[float]:
        if self.begin is None:
            return None
        try:
            return self.begin.elapsed_time(self.event) / 1e3 if self.event.query() else None
        except RuntimeError:  # a figure for logs only: never let it fail the pull
            log.exception("timing a KV copy failed")
            return None

    def poll(self) -> TransferState:
        if self.event.query():
            self._keep = ()
            return TransferState.DONE
        return TransferState.RUNNING

    def cancel(self) -> bool:
        return self.poll() is TransferState.DONE


class CudaIpcTransport(OneSidedTransport):
    name = "cuda_ipc"

    def __init__(self, channels: ChannelPool, device: torch.device, faults: FaultPlan | None = None) -> None:
        super().__init__(channels, faults)
        self.device = torch.device(device)
        self.stream = copy_stream(self.device)
        """High-priority side stream of this worker's device: every pull's copy runs on it, ahead of
        the decode steps' queued kernels (a pull is short; the request waits for it)."""
        self._src_streams: dict[torch.device, torch.cuda.Stream] = {}

    async def _fetch_peer(self, address: str, timeout: float, metadata: tuple) -> tuple[str, kpb.CudaIpcHandle]:
        h = await self.channels.stub(address, kgrpc.KVTransferStub).GetIpcHandle(kpb.IpcHandleRequest(), timeout=timeout,
                                                                                 metadata=metadata)
        return h.incarnation, h

    def _open_peer(self, raw: kpb.CudaIpcHandle) -> torch.Tensor:
        return open_handle(raw)

    def _peer_blocks(self, peer: torch.Tensor) -> int:
        return peer.shape[1]

    def launch(self, remote: torch.Tensor, src: Sequence[int], dst: Sequence[int], pool: KVCachePool, first: int = 0) -> CudaCopy:
        """Queue the copy of blocks ``src`` of ``remote`` into blocks ``dst`` of ``pool`` on the side
        stream; returns at once.  The destination blocks are fresh (never in a launched step), so
        the copy need not wait for the compute stream."""
        n = len(src)
        local = pool.kv
        dev = local.device
        nbytes = n * local[:, :1].numel() * local.element_size()
        event = torch.cuda.Event(enable_timing=True)
        begin = torch.cuda.Event(enable_timing=True)
        if n == 0:
            event.record(self.stream)
            return CudaCopy(event, 0, ())
        if remote.device == dev:
            with torch.cuda.device(dev), torch.cuda.stream(self.stream):
                s_idx, d_idx = _ids(src, dev), _ids(dst, dev)
                begin.record(self.stream)
                copy_blocks(remote, s_idx, local, d_idx)
                event.record(self.stream)
            return CudaCopy(event, nbytes, (s_idx, d_idx), begin)
        src_stream = self._src_streams.get(remote.device)
        if src_stream is None:
            src_stream = self._src_streams[remote.device] = copy_stream(remote.device)
        shape = (remote.shape[0], n) + tuple(remote.shape[2:])
        with torch.cuda.device(dev):
            begin.record(self.stream)  # both timing events on the destination's stream: elapsed_time needs one device
        with torch.cuda.device(remote.device), torch.cuda.stream(src_stream):
            s_idx = _ids(src, remote.device)
            staged = torch.empty(shape, dtype=remote.dtype, device=remote.device)
            copy_blocks(remote, s_idx, staged, torch.arange(n, device=remote.device))
            with torch.cuda.stream(self.stream):  # the peer copy orders both streams itself
                moved = staged.to(dev, non_blocking=True)
        with torch.cuda.device(dev), torch.cuda.stream(self.stream):
            d_idx = _ids(dst, dev)
            copy_blocks(moved, torch.arange(n, device=dev), local, d_idx)
            event.record(self.stream)
        return CudaCopy(event, nbytes, (s_idx, staged, moved, d_idx), begin)
