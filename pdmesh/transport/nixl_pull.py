"""A NIXL pull's READs and where they land (``NixlKVTransport.launch``, engine thread).

A pull reads, for each source rank the descriptor's layout names (``read_ranks``: each KV head
once), that rank's blocks ``src`` from one of two places on the peer:

* its pool, one region per (layer, block) — the source packed nothing (no arena there, or it was
  full, or this worker has no arena and did not ask);
* a *packed extent* of its staging arena (``BeginRead`` with ``stage``; ``NixlStagedRegion``),
  laid out ``[ranks, L, n, 2, bs, that rank's heads, D]``: a pull (or a piece ``[first, first + m)``
  of a slowed one) reads ``packed[i, :, first:first + m]``, one region when it is the whole of it,
  else one per layer.

and lands them either straight in the pool — when the destination rank takes exactly the source
rank's heads and nothing else (equal tensor-parallel sizes) — or through a *landing buffer*
``[L, m, 2, bs, source heads, D]``, whose heads are then written into every rank that holds them
(``KVCachePool.land``: one block-copy kernel per destination rank for whole blocks, a head slice
otherwise) on a high-priority side stream.  The kind of each READ (``kv_nixl_reads_total{kind}``):

* ``unstaged``: from the peer's pool (into the pool over the prepared lists, or — mixed TP sizes —
  into a landing buffer);
* ``direct``: a packed extent straight into consecutive pool blocks (one region per layer, no scatter);
* ``staged``: a packed extent into a landing buffer taken from this worker's arena (scattered
  blocks, or mixed TP sizes);
* ``fallback``: a packed extent with this arena full: block by block into the pool, or (mixed TP
  sizes) into a buffer registered with NIXL for this pull.

A landing buffer is an extent of this worker's arena when there is one and it has room (a full
arena is counted in ``kv_nixl_staging_fallbacks_total{side="destination"}``), else a buffer
registered for the pull — never needed for equal TP sizes, which then read block by block.  It
belongs to the pull and is given back once nothing can write it any more: every READ stopped (done,
failed, or cancelled and certainly stopped) and every landing copy ran.

Region lists are built with numpy (no per-block Python); paired rows that continue each other on
both sides are merged before NIXL sees them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch

from pdmesh.kv.pool import KVCachePool
from pdmesh.kv.shards import Piece
from pdmesh.transport.base import BaseTransfer, DoneTransfer, TransferError, TransferState
from pdmesh.v1 import kv_transfer_pb2 as kpb

if TYPE_CHECKING:
    from pdmesh.transport.nixl import NixlAgent, NixlKVTransport, NixlRead, NixlSource

log = logging.getLogger(__name__)


def check_staged(staged: kpb.NixlStagedRegion, md: kpb.NixlMetadata, num_ranks: int, num_blocks: int) -> str:
    """Why a source's packed extent cannot be what was asked for ('' when it is): the read's blocks,
    all layers, of each of the ``num_ranks`` source ranks, inside the staging arena the peer registered."""
    if staged.num_blocks != num_blocks:
        return f"{staged.num_blocks} blocks packed, {num_blocks} asked for"
    if staged.num_ranks != num_ranks:
        return f"{staged.num_ranks} ranks packed, {num_ranks} read"
    want = num_ranks * md.num_layers * num_blocks * md.block_bytes
    if staged.nbytes != want:
        return f"{staged.nbytes} bytes packed, {want} expected"
    if not (md.staging_address <= staged.address and staged.address + staged.nbytes <= md.staging_address + md.staging_bytes):
        return "the region lies outside the peer's staging arena"
    return ""


def block_rows(base: int, layer_stride: int, block_bytes: int, ids: Sequence[int] | np.ndarray, num_layers: int) -> np.ndarray:
    """[L * len(ids), 2] (address, length), layer-major: block ``ids[j]`` of layer ``l`` of memory laid
    out ``[L, blocks, ...]`` at ``base``, i.e. ``base + l * layer_stride + ids[j] * block_bytes``."""
    b = np.asarray(ids, dtype=np.uint64)
    out = np.empty((num_layers * len(b), 2), dtype=np.uint64)
    out[:, 0] = (np.uint64(base) + np.arange(num_layers, dtype=np.uint64)[:, None] * np.uint64(layer_stride)
                 + b[None, :] * np.uint64(block_bytes)).ravel()
    out[:, 1] = block_bytes
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


def consecutive(ids: Sequence[int]) -> bool:
    return bool(len(ids) <= 1 or np.all(np.diff(np.asarray(ids)) == 1))


class Landing:
    """A local buffer ``[L, m, 2, bs, source heads, D]`` that one source rank's blocks are READ
    into, then landed on the ranks that hold those heads; ``release`` gives it back, once."""

    def __init__(self, rank: int, buffer: torch.Tensor, device_id: int, in_arena: bool, release: Callable[[], None]) -> None:
        self.rank = rank
        self.buffer = buffer
        self.device_id = device_id
        """The buffer's device as NIXL names it."""
        self.in_arena = in_arena
        """An extent of this worker's staging arena (else a buffer registered for this pull)."""
        self._release: Optional[Callable[[], None]] = release
        self.events: Optional[list[torch.cuda.Event]] = None
        """The landing copies' events once they are queued (empty: ran synchronously, on CPU)."""

    def landed(self) -> bool:
        return self.events is not None and all(e.query() for e in self.events)

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


class NixlPull(BaseTransfer):
    """A pull's READs (one per source rank) and the landings of those that went into a buffer.
    DONE when every READ is and every buffer has landed; the buffers are given back once nothing
    can write them any more."""

    def __init__(self, reads: list["NixlRead"], landings: list[Landing],
                 land: Callable[[Landing], list[torch.cuda.Event]], error: str = "") -> None:
        self.reads = reads
        self.landings = landings
        self._land = land
        """Queue a landing's copies: their events (empty when done synchronously, on CPU)."""
        self.nbytes = sum(r.nbytes for r in reads)
        self.error = error
        """Set when the pull failed before all of its READs were posted."""

    def poll(self) -> TransferState:
        if self.error:
            self.cancel()
            return TransferState.FAILED
        running = False
        for r in self.reads:
            st = r.poll()
            if st is TransferState.FAILED:
                self.error = r.error or "NIXL read failed"
                self.cancel()
                return TransferState.FAILED
            running |= st is TransferState.RUNNING
        if running:
            return TransferState.RUNNING
        for s in self.landings:
            if s.events is None:
                s.events = self._land(s)
        if all(s.landed() for s in self.landings):
            self._give_back()
            return TransferState.DONE
        return TransferState.RUNNING

    def cancel(self) -> bool:
        """Stopped once every READ is (NIXL cancels them) and no landing copy is still queued (a
        kernel cannot be recalled); then the buffers go back."""
        stopped = all([r.cancel() for r in self.reads])
        if stopped and all(s.events is None or s.landed() for s in self.landings):
            self._give_back()
            return True
        return False

    def _give_back(self) -> None:
        for s in self.landings:
            s.release()


def land(agent: "NixlAgent", s: Landing, pieces: list[Piece], dst: list[int], pool: KVCachePool) -> list[torch.cuda.Event]:
    """Write a landing buffer's heads into every rank that holds them: at once on CPU; on GPUs on a
    side stream of the buffer's device, returning an event per device written (to poll)."""
    dev = s.buffer.device
    if dev.type != "cuda":
        pool.land(pieces, s.rank, dst, s.buffer)
        return []
    devices = {dev} | {pool.ranks[p.dst_rank].device for p in pieces if p.src_rank == s.rank}
    events = []
    with torch.cuda.device(dev), torch.cuda.stream(agent.streams(dev)):
        pool.land(pieces, s.rank, dst, s.buffer)
        for d in devices:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(d))
            events.append(ev)
    return events


def _landing(tr: "NixlKVTransport", rank: int, heads: int, m: int, pool: KVCachePool, device: torch.device,
             registered: bool) -> Optional[Landing]:
    """A landing buffer ``[L, m, 2, bs, heads, D]``: an extent of this worker's arena, else (when
    ``registered``) a buffer on ``device`` registered with NIXL for this pull, else None."""
    a, lay = tr.agent, pool.layout
    shape = (lay.num_layers, m, 2, lay.block_size, heads, lay.head_dim)
    nbytes = lay.head_block_bytes(heads) * m
    arena = a.arena
    if arena is not None:
        ext = arena.alloc(nbytes)
        if ext is not None:
            return Landing(rank, arena.view(ext, shape, pool.kv.dtype), a.device_id, True, lambda: arena.free(ext))
        tr.arena_full(nbytes)
    if not registered:
        return None
    buf = torch.empty(shape, dtype=pool.kv.dtype, device=device)
    reg = a.agent.register_memory(buf)

    def release() -> None:
        try:
            a.agent.deregister_memory(reg)
        except Exception as exc:  # noqa: BLE001 - best effort; the buffer is freed with the object
            log.info("releasing a NIXL landing buffer: %r", exc)

    return Landing(rank, buf, (device.index or 0) if device.type == "cuda" else 0, False, release)


def launch_pull(tr: "NixlKVTransport", source: "NixlSource", ranks: list[int], pieces: list[Piece], src: Sequence[int],
                dst: Sequence[int], pool: KVCachePool, first: int = 0) -> BaseTransfer:
    """Post a pull's READs: blocks ``src`` (at ``first`` in the pull's source blocks, for a piece of a
    slowed pull) of the peer's source ranks ``ranks`` into blocks ``dst`` of ``pool``'s ranks, as
    ``pieces`` say (see the module docstring for which kind each READ is).  Raises TransferError
    when nothing could be posted; a failure after some READs were posted is a FAILED pull, so
    that the connector keeps the blocks until those have stopped."""
    a, peer, staged = tr.agent, source.peer, source.staged
    lay, L, m = pool.layout, a.num_layers, len(src)
    if m == 0:
        return DoneTransfer()
    sbb = peer.block_bytes
    src_heads = sbb // (2 * lay.block_size * lay.head_dim * lay.elem_bytes)  # KV heads of one source rank
    hs = lay.local_kv_heads
    reads: list[NixlRead] = []
    landings: list[Landing] = []
    dst = list(dst)
    try:
        for i, r in enumerate(ranks):
            mine = [p for p in pieces if p.src_rank == r]
            whole = len(mine) == 1 and mine[0].num_heads == hs and mine[0].dst_heads == (0, hs) and sbb == a.block_bytes
            into = mine[0].dst_rank
            if whole and staged is None:
                tr.count("unstaged")
                reads.append(tr.read(peer, src, dst, src_rank=r, dst_rank=into))
                continue
            if staged is None:
                remote = block_rows(peer.bases[r], peer.per_layer * sbb, sbb, src, L)
            else:
                n = staged.num_blocks
                remote = block_rows(staged.address + i * L * n * sbb, n * sbb, sbb, np.arange(first, first + m), L)
            if whole:
                local = block_rows(a.rank_bases[into], a.per_layer * a.block_bytes, a.block_bytes, dst, L)
                if consecutive(dst):
                    tr.count("direct")
                    reads.append(tr.read_regions(peer, local, a.rank_devices[into], remote, peer.devices[r]))
                    continue
                s = _landing(tr, r, src_heads, m, pool, pool.ranks[into].device, registered=False)
                if s is None:  # this arena full: block by block into the pool
                    tr.count("fallback")
                    reads.append(tr.read_regions(peer, local, a.rank_devices[into], remote, peer.devices[r]))
                    continue
            else:  # mixed TP sizes: always through a buffer
                s = _landing(tr, r, src_heads, m, pool, pool.ranks[into].device, registered=True)
                assert s is not None
            landings.append(s)
            tr.count("unstaged" if staged is None else "staged" if s.in_arena else "fallback")
            reads.append(tr.read_regions(peer, block_rows(s.buffer.data_ptr(), m * sbb, sbb, np.arange(m), L), s.device_id,
                                         remote, peer.devices[r]))
    except Exception as exc:
        if reads:  # some READs may be writing already: a failed pull, stopped like any other
            log.warning("NIXL pull failed after %d READs were posted: %r", len(reads), exc)
            return NixlPull(reads, landings, lambda s: [], error=f"NIXL pull could not start: {exc!r}")
        for s in landings:
            s.release()
        if isinstance(exc, TransferError):
            raise
        raise TransferError(f"NIXL pull could not start: {exc!r}") from exc
    return NixlPull(reads, landings, lambda s: land(a, s, pieces, dst, pool))
