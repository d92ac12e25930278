"""``cuda_ipc`` KV transport: same host, one or more GPUs, no bytes through the CPU.

The prefill worker exports the CUDA IPC handle of its whole KV pool once
(``KVTransfer.GetIpcHandle``; with tensor parallelism, one per rank, rank 0 handing out the
handles its ranks shared with it).  The decode worker opens each peer's handles once per peer
process (cached by address and incarnation: a restarted prefill has a new incarnation, so a stale
handle is never used).  A pull is one-sided: ``prepare`` (event loop) pins the source lease
(``BeginRead``); ``start`` (the engine thread, between steps) launches the copies on side streams
and records CUDA events; the connector polls ``event.query()``.  No thread, no blocking
synchronize.  Per piece (``pdmesh.kv.shards``: one per rank when TP sizes agree): on one GPU one
block-copy kernel; across two a gather into a contiguous buffer on the source GPU, one
peer-to-peer copy and a scatter on the destination.  Head slices (different TP sizes) go through
the same gather/scatter with strided views.

Devices are always explicit (``torch.cuda.device(...)``, ``torch.cuda.Stream(device)``): the engine
thread's current device need not be the worker's, and rank 0 writes the other ranks' pools on
their devices (it maps them at start-up: ``pool_share`` / ``open_share``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from pdmesh.kv.copy import SideStreams, copy_heads, gather_heads, scatter_heads
from pdmesh.kv.pool import KVCachePool
from pdmesh.kv.shards import Piece
from pdmesh.rpc.channels import ChannelPool
from pdmesh.transport.base import BaseTransfer, TransferError, TransferState, read_ranks
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.one_sided import OneSidedTransport
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import kv_transfer_pb2 as kpb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc

log = logging.getLogger(__name__)

_SHARE_FIELDS = ("device", "handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle",
                 "ref_counter_offset", "event_handle", "event_sync_required")


def pool_share(kv: torch.Tensor) -> tuple[str, Any]:
    """How a rank hands its KV pool to rank 0 over a pipe: the tensor itself on CPU (in shared
    memory: torch pickles it as a handle), the fields of its CUDA IPC handle on a GPU."""
    if kv.device.type != "cuda":
        if not kv.is_shared():
            raise ValueError("a CPU pool must be in shared memory to be mapped by rank 0")
        return "cpu", kv
    values = kv.untyped_storage()._share_cuda_()
    fields = dict(zip(_SHARE_FIELDS, values))
    fields["event_handle"] = fields["event_handle"] or b""
    return "cuda", {**fields, "shape": list(kv.shape), "dtype": str(kv.dtype).removeprefix("torch.")}


def open_share(share: tuple[str, Any]) -> torch.Tensor:
    """Rank 0: a tensor viewing another rank's pool (``pool_share``)."""
    kind, body = share
    return body if kind == "cpu" else open_handle(kpb.CudaIpcHandle(**body))


def export_handle(pool: KVCachePool, incarnation: str, rank: int = 0) -> kpb.CudaIpcHandle:
    """Prefill side: the IPC handle of rank ``rank``'s pool storage."""
    if pool.kv.device.type != "cuda":
        raise TransferError("the KV pool is not on a GPU")
    if not 0 <= rank < len(pool.ranks):
        raise TransferError(f"no tensor-parallel rank {rank} here")
    if rank == 0:
        body = pool_share(pool.kv)[1]
    else:
        body = pool.shares[rank][1]
    return kpb.CudaIpcHandle(**body, incarnation=incarnation)


def open_handle(h: kpb.CudaIpcHandle) -> torch.Tensor:
    """Decode side: a tensor viewing the peer's pool (costs milliseconds: do it once per peer)."""
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        h.device, h.handle, h.storage_size_bytes, h.storage_offset_bytes, h.ref_counter_handle,
        h.ref_counter_offset, h.event_handle or None, h.event_sync_required)
    t = torch.empty(0, dtype=getattr(torch, h.dtype), device=f"cuda:{h.device}")
    t.set_(storage, 0, tuple(h.shape))  # type: ignore[call-overload]  # torch's stub wants a stride; it is optional at runtime
    return t


def _ids(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Block ids on ``device`` through pinned memory, on the current stream (no host sync)."""
    return torch.tensor(list(ids), dtype=torch.int64).pin_memory().to(device, non_blocking=True)


class CudaCopy(BaseTransfer):
    """Launched copies (one per piece): done when all their events have fired.  A kernel cannot be
    recalled, so ``cancel`` reports stopped only once they ran.  Each piece's ``begin`` (recorded
    before its copy, on the destination device's stream) and ``event`` time it on the GPU."""

    def __init__(self, timings: list[tuple[Optional[torch.cuda.Event], torch.cuda.Event]], nbytes: int, keep: tuple) -> None:
        self.timings = timings
        self.nbytes = nbytes
        self._keep = keep  # tensors the queued work uses, alive until it ran

    def device_seconds(self) -> Optional[float]:
        """The longest piece's copy time (pieces on different GPUs run side by side)."""
        try:
            timed = [(b, e) for b, e in self.timings if b is not None]
            if len(timed) != len(self.timings) or not all(e.query() for _, e in timed):
                return None
            return max(b.elapsed_time(e) for b, e in timed) / 1e3
        except RuntimeError:  # a figure for logs only: never let it fail the pull
            log.exception("timing a KV copy failed")
            return None

    def poll(self) -> TransferState:
        if all(e.query() for _, e in self.timings):
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
        self._stream = SideStreams()
        """A high-priority side stream per GPU a copy touches (this worker's first): every pull's
        copies run there, ahead of the decode steps' queued kernels (a pull is short; the request
        waits for it)."""
        self._stream(self.device)

    async def _fetch_peer(self, desc: pb.KVDescriptor, timeout: float, metadata: tuple) -> tuple[str, dict[int, kpb.CudaIpcHandle]]:
        stub = self.channels.stub(desc.address, kgrpc.KVTransferStub)
        handles = {r: await stub.GetIpcHandle(kpb.IpcHandleRequest(rank=r), timeout=timeout, metadata=metadata)
                   for r in read_ranks(desc.layout)}
        incarnations = {h.incarnation for h in handles.values()}
        if len(incarnations) != 1:
            raise TransferError(f"{desc.address} restarted while its IPC handles were fetched")
        return incarnations.pop(), handles

    def _open_peer(self, raw: dict[int, kpb.CudaIpcHandle]) -> dict[int, torch.Tensor]:
        return {r: open_handle(h) for r, h in raw.items()}

    def _peer_blocks(self, peer: dict[int, torch.Tensor]) -> int:
        return min(t.shape[1] for t in peer.values())

    def launch(self, peer: dict[int, torch.Tensor], ranks: list[int], pieces: list[Piece], src: Sequence[int],
               dst: Sequence[int], pool: KVCachePool, first: int = 0) -> CudaCopy:
        """Queue every piece's copy (blocks ``src`` of the peer's source rank into blocks ``dst`` of the
        destination rank's pool) on side streams; returns at once.  The destination blocks are fresh
        (never in a launched step), so the copies need not wait for any compute stream."""
        timings, keep, nbytes = [], [], 0
        for p in pieces:
            remote = peer.get(p.src_rank)
            if remote is None:
                raise TransferError(f"the peer's rank {p.src_rank} pool is not open")
            local = pool.ranks[p.dst_rank]
            begin, event, held = self._copy(remote, p.src_heads, local, p.dst_heads, src, dst)
            timings.append((begin, event))
            keep.append(held)
            nbytes += len(src) * local[:, :1, :, :, p.dst_heads[0]:p.dst_heads[1]].numel() * local.element_size()
        return CudaCopy(timings, nbytes, tuple(keep))

    def _copy(self, remote: torch.Tensor, sh: tuple[int, int], local: torch.Tensor, dh: tuple[int, int],
              src: Sequence[int], dst: Sequence[int]) -> tuple[Optional[torch.cuda.Event], torch.cuda.Event, tuple]:
        n = len(src)
        dev = local.device
        stream = self._stream(dev)
        event = torch.cuda.Event(enable_timing=True)
        begin = torch.cuda.Event(enable_timing=True)
        if n == 0:
            with torch.cuda.device(dev):
                event.record(stream)
            return None, event, ()
        if remote.device == dev:
            with torch.cuda.device(dev), torch.cuda.stream(stream):
                s_idx, d_idx = _ids(src, dev), _ids(dst, dev)
                begin.record(stream)
                copy_heads(remote, s_idx, sh, local, d_idx, dh)
                event.record(stream)
            return begin, event, (s_idx, d_idx)
        src_stream = self._stream(remote.device)
        with torch.cuda.device(dev):
            begin.record(stream)  # both timing events on the destination's stream: elapsed_time needs one device
        with torch.cuda.device(remote.device), torch.cuda.stream(src_stream):
            s_idx = _ids(src, remote.device)
            staged = gather_heads(remote, s_idx, sh)
            with torch.cuda.stream(stream):  # the peer copy orders both streams itself
                moved = staged.to(dev, non_blocking=True)
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            d_idx = _ids(dst, dev)
            scatter_heads(moved, local, d_idx, dh)
            event.record(stream)
        return begin, event, (s_idx, staged, moved, d_idx)
