"""Decode side of a staged NIXL pull: READs of a region the source packed (``BeginRead`` with
``stage``; ``pdmesh.transport.staging`` says who owns which extent).

The packed region holds the pull's ``n`` source blocks as ``[L, n, 2, bs, Hkv, D]``; a pull (or a
piece ``[first, first + m)`` of a slowed one) reads ``packed[:, first:first + m]``: one region when it
is the whole of it, else one per layer.  Where it lands, chosen per pull on the engine thread:

* ``direct``: the destination blocks are consecutive, so each layer's run of them is one region of
  the pool: READ straight into the pool (one region per layer), no scatter.
* ``staged``: an extent of this worker's arena ``[L, m, ...]``: one READ, then one scatter kernel
  into the pool blocks (a side stream of the pool's GPU; torch's ``index_copy_`` on CPU).
* ``fallback``: this arena is full: one region per (layer, block), from the packed region into the
  pool blocks, as an unstaged pull (counted in ``kv_nixl_staging_fallbacks_total{side="destination"}``).

Region lists are built with numpy (no per-block Python); paired rows that continue each other on
both sides are merged before NIXL sees them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from pdmesh.transport.base import BaseTransfer, DoneTransfer, TransferState
from pdmesh.transport.staging import Extent
from pdmesh.v1 import kv_transfer_pb2 as kpb

if TYPE_CHECKING:
    from pdmesh.transport.nixl import NixlAgent, NixlKVTransport, NixlRead, NixlSource

log = logging.getLogger(__name__)


def check_staged(staged: kpb.NixlStagedRegion, md: kpb.NixlMetadata, agent: "NixlAgent", num_blocks: int) -> str:
    """Why a source's staged region cannot be what was asked for ('' when it is): the blocks of
    the read, all layers, inside the staging arena the peer registered."""
    if staged.num_blocks != num_blocks:
        return f"{staged.num_blocks} blocks packed, {num_blocks} asked for"
    if staged.nbytes != agent.staged_bytes(num_blocks):
        return f"{staged.nbytes} bytes packed, {agent.staged_bytes(num_blocks)} expected"
    if not (md.staging_address <= staged.address and staged.address + staged.nbytes <= md.staging_address + md.staging_bytes):
        return "the region lies outside the peer's staging arena"
    return ""


def layer_rows(base: int, layer_stride: int, length: int, num_layers: int) -> np.ndarray:
    """[L, 2] (address, length): ``length`` bytes at ``base + l * layer_stride`` for every layer."""
    out = np.empty((num_layers, 2), dtype=np.uint64)
    out[:, 0] = np.uint64(base) + np.arange(num_layers, dtype=np.uint64) * np.uint64(layer_stride)
    out[:, 1] = length
    return out


def merge_regions(local: np.ndarray, remote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paired [k, 2] (address, length) rows of equal lengths, with every row that continues the
    previous one on both sides merged into it."""
    if len(local) <= 1:
        return local, remote
    cont = (local[1:, 0] == local[:-1, 0] + local[:-1, 1]) & (remote[1:, 0] == remote[:-1, 0] + remote[:-1, 1])
    starts = np.flatnonzero(np.concatenate(([True], ~cont)))
    lengths = np.add.reduceat(local[:, 1], starts).astype(np.uint64)
    return np.stack([local[starts, 0], lengths], 1), np.stack([remote[starts, 0], lengths], 1)


def consecutive(ids: np.ndarray) -> bool:
    return bool(len(ids) <= 1 or np.all(np.diff(ids) == 1))


class StagedRead(BaseTransfer):
    """A READ into an extent of this worker's arena, then one scatter into the pool blocks; the
    extent is freed once neither can write any more (done, failed, or cancelled and stopped)."""

    def __init__(self, agent: "NixlAgent", read: "NixlRead", ext: Extent, dst: Sequence[int]) -> None:
        self.agent = agent
        self.read = read
        self.ext: Optional[Extent] = ext
        self.dst = list(dst)
        self.nbytes = read.nbytes
        self.state = TransferState.RUNNING
        self._scatter: Optional[Any] = None
        """(CUDA event, tensors it uses) once the scatter is queued."""

    def _end(self, st: TransferState) -> TransferState:
        if self.ext is not None:
            self.agent.arena.free(self.ext)
            self.ext = None
        self._scatter = None
        self.state = st
        return st

    def poll(self) -> TransferState:
        if self.state is not TransferState.RUNNING:
            return self.state
        if self._scatter is None:
            st = self.read.poll()
            if st is TransferState.RUNNING:
                return st
            if st is TransferState.FAILED:
                self.error = self.read.error
                return self._end(st)
            self._scatter = self._start_scatter()
            if self._scatter is None:  # ran synchronously (CPU)
                return self._end(TransferState.DONE)
        if self._scatter[0].query():
            return self._end(TransferState.DONE)
        return TransferState.RUNNING

    def _start_scatter(self):
        """pool[:, dst] = extent: one kernel on the pool GPU's side stream (returns its event and
        the tensors it uses), or torch's index_copy_ on CPU (returns None when done)."""
        a = self.agent
        kv = a.pool.kv
        staged = a.staged_view(self.ext, len(self.dst))
        idx = torch.tensor(self.dst, dtype=torch.int64)
        if not kv.is_cuda:
            kv.index_copy_(1, idx, staged)
            return None
        from pdmesh.kv.copy import copy_blocks

        stream = a.side_stream()
        with torch.cuda.device(kv.device), torch.cuda.stream(stream):
            d_idx = idx.pin_memory().to(kv.device, non_blocking=True)
            s_idx = torch.arange(len(self.dst), device=kv.device)
            copy_blocks(staged, s_idx, kv, d_idx)
            done = torch.cuda.Event()
            done.record(stream)
        return done, (d_idx, s_idx, staged)

    def cancel(self) -> bool:
        if self.state is not TransferState.RUNNING:
            return True
        if self._scatter is None:
            if not self.read.cancel():
                return False  # NIXL may still write the extent: keep it (and the blocks) until it stops
            self.error = self.read.error or "cancelled"
            self._end(TransferState.FAILED)
            return True
        return self.poll() is not TransferState.RUNNING  # a queued kernel cannot be recalled


def read_staged(tr: "NixlKVTransport", source: "NixlSource", first: int, dst: Sequence[int]) -> BaseTransfer:
    """Engine thread: post the READ of packed blocks ``[first, first + len(dst))`` of ``source``
    into local blocks ``dst`` (direct, staged or fallback: see the module docstring)."""
    a = tr.agent
    staged, md = source.staged, source.peer.md
    L, bb, n, m = a.num_layers, a.block_bytes, staged.num_blocks, len(dst)
    if m == 0:
        return DoneTransfer()
    nbytes = a.staged_bytes(m)
    remote = layer_rows(staged.address + first * bb, n * bb, m * bb, L)  # packed[l, first:first + m]
    d = np.asarray(dst, dtype=np.int64)
    if consecutive(d):
        tr.count("direct")
        return _post(tr, source, layer_rows(a.base + int(d[0]) * bb, a.per_layer * bb, m * bb, L), remote, nbytes)
    ext = a.arena.alloc(nbytes)
    if ext is None:
        tr.count("fallback")
        log.info("NIXL staging arena full (%d of %d bytes in use): reading %d blocks block by block",
                 a.arena.used_bytes, a.arena.capacity, m)
        local = np.empty((L * m, 2), dtype=np.uint64)
        local[:, 0] = np.uint64(a.base) + (np.arange(L, dtype=np.uint64)[:, None] * np.uint64(a.per_layer)
                                           + d.astype(np.uint64)[None, :]).ravel() * np.uint64(bb)
        local[:, 1] = bb
        rem = np.empty_like(local)
        rem[:, 0] = np.uint64(staged.address) + (np.arange(L, dtype=np.uint64)[:, None] * np.uint64(n) + np.uint64(first)
                                                 + np.arange(m, dtype=np.uint64)[None, :]).ravel() * np.uint64(bb)
        rem[:, 1] = bb
        return _post(tr, source, local, rem, nbytes)
    tr.count("staged")
    try:
        read = _post(tr, source, layer_rows(a.arena.address + ext.offset, m * bb, m * bb, L), remote, nbytes)
    except BaseException:
        a.arena.free(ext)  # nothing was posted
        raise
    return StagedRead(a, read, ext, dst)


def _post(tr: "NixlKVTransport", source: "NixlSource", local: np.ndarray, remote: np.ndarray, nbytes: int) -> "NixlRead":
    """One READ of paired regions (merged first) from the peer into this worker's memory."""
    a, md = tr.agent, source.peer.md
    local, remote = merge_regions(local, remote)

    def descs(rows: np.ndarray, device_id: int) -> np.ndarray:
        out = np.empty((len(rows), 3), dtype=np.uint64)
        out[:, :2] = rows
        out[:, 2] = device_id
        return out

    def make():
        return a.agent.initialize_xfer("READ", a.agent.get_xfer_descs(descs(local, a.device_id), a.mem_type),
                                       a.agent.get_xfer_descs(descs(remote, md.device_id), md.mem_type),
                                       source.peer.agent_name)

    return tr.post(make, nbytes)
