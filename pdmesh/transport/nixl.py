"""``nixl`` KV transport: one-sided READs with NIXL (UCX underneath: RDMA, NVLink, TCP, shared
memory), for KV between hosts; host memory (CPU pools) and GPU memory alike.

Each worker that offers ``nixl`` has one ``NixlAgent``: it registers the whole KV pool once and
prepares a descriptor list with one entry per (layer, block) — the pool's layout
``[L, P, 2, bs, Hkv, D]`` makes each such region contiguous — indexed ``l * P + b`` (with tensor
parallelism every rank's pool, mapped by rank 0, registered by rank 0's one agent, indexed
``(r * L + l) * P + b``).  With ``--nixl-staging-mb`` > 0 it also registers a *staging arena*
once (``pdmesh.transport.staging``), on the pool's device: the one place where a pull's blocks are
packed (source) or land before being written into the pool (destination).

Peers get the agent's metadata through ``KVTransfer.GetNixlMetadata`` (with the process
incarnation) and load it once per incarnation: a restarted peer has a new one, so stale metadata
is dropped and fetched again.  ``prepare`` pins the source lease (``BeginRead``), asking the source
to *stage* the read when this worker has an arena: the source packs each source rank's blocks into
one extent of its arena (one gather per rank, ``NixlAgent.pack``) and answers where.  ``start``
(engine thread) posts the READs, per source rank (``pdmesh.transport.nixl_pull`` says which
kinds): one region per (layer, block) from the peer's pool, or one region (one per layer for a
piece) from a packed extent — straight into the pool when the destination rank holds exactly the
source rank's heads and, for a packed source, its blocks are consecutive; otherwise into a landing
buffer (an extent of this arena, or a buffer registered for the pull) whose heads are then written
into the ranks that hold them (mixed tensor-parallel sizes, scattered blocks).  Index arrays and
region lists are computed by numpy (no per-block Python work); transfers are polled with NIXL's
own state check, and the hand-off ends the read when the transfer has stopped.  ``UCX_TLS``
chooses the links (e.g. ``UCX_TLS=tcp``), read by UCX itself.

Install: ``pip install nixl-cu12`` (imports and moves host memory without a GPU) or ``nixl-cu13``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from pdmesh.kv.copy import SideStreams, copy_blocks, gather_heads
from pdmesh.kv.pool import KVCachePool
from pdmesh.kv.shards import Piece, source_ranks
from pdmesh.metrics import ServiceMetrics
from pdmesh.rpc.channels import ChannelPool
from pdmesh.transport.base import BaseTransfer, TransferError, TransferState, read_ranks
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.one_sided import OneSidedTransport, ReadPin
from pdmesh.transport.staging import Extent, StagingArena
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import kv_transfer_pb2 as kpb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc

log = logging.getLogger(__name__)

_MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")


def import_nixl() -> Any:
    """NIXL's Python API module, from whichever build is installed; ImportError says how to get one."""
    import importlib

    errors = []
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("the nixl transport needs NIXL: pip install nixl-cu12 (or nixl-cu13 on CUDA 13) — " + "; ".join(errors))


def nixl_available() -> bool:
    try:
        import_nixl()
        return True
    except ImportError:
        return False


def region_index(num_layers: int, per_layer: int, block_ids: Sequence[int], rank: int = 0) -> np.ndarray:
    """Descriptor indices of ``block_ids`` of rank ``rank``'s pool over all layers, layer-major:
    [L * len(block_ids)]."""
    b = np.asarray(block_ids, dtype=np.int64)
    layers = np.arange(num_layers, dtype=np.int64) + rank * num_layers
    return (layers[:, None] * per_layer + b[None, :]).ravel()


def _device_id(device: torch.device) -> int:
    return (device.index or 0) if device.type == "cuda" else 0


class NixlAgent:
    """This worker's NIXL agent, with its KV pools (and staging arena) registered once."""

    def __init__(self, name: str, pool: KVCachePool, incarnation: str, num_threads: int = 0, staging_bytes: int = 0) -> None:
        api = import_nixl()
        self.api = api
        self.pool = pool
        self.use_device()
        cfg = api.nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"],
                                    num_threads=num_threads, sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = api.nixl_agent(name, cfg)
        if "UCX" not in self.agent.backends:
            raise TransferError("NIXL has no UCX backend here")
        self.name = name
        self.num_threads = num_threads
        self.incarnation = incarnation
        kv = pool.kv
        self.mem_type = "VRAM" if kv.device.type == "cuda" else "DRAM"
        self.device_id = _device_id(kv.device)
        self.num_layers, self.per_layer = kv.shape[0], kv.shape[1]
        self.block_bytes = kv[0, 0].numel() * kv.element_size()
        self.base = kv.data_ptr()
        self.rank_bases = [t.data_ptr() for t in pool.ranks]
        self.rank_devices = [_device_id(t.device) for t in pool.ranks]
        lay = pool.layout
        self.pack_ranks = source_ranks(lay.num_kv_heads, lay.tp_size)
        """The ranks whose blocks a staged read packs, in order (what a reader reads: each head once)."""
        self.streams = SideStreams()
        """High-priority side streams for the gathers and landings of staged pulls."""
        t0 = time.perf_counter()
        self.regs = [self.agent.register_memory(t) for t in pool.ranks]
        self.local = self.agent.prep_xfer_dlist("", np.concatenate([
            self.descs(b, device_id=d) for b, d in zip(self.rank_bases, self.rank_devices)]), self.mem_type)
        self.arena: Optional[StagingArena] = None
        """The staging arena (``--nixl-staging-mb``; None: staged pulls off), registered once."""
        if staging_bytes > 0:
            self.arena = StagingArena(staging_bytes, kv.device)
            self.arena_reg = self.agent.register_memory(self.arena.buf)
        log.info("NIXL agent %s: registered %d KV pool(s) of %.1f MB (%s, %d regions) and a %.1f MB staging arena in %.1f ms",
                 name, len(pool.ranks), kv.numel() * kv.element_size() / 1e6, self.mem_type,
                 len(pool.ranks) * self.num_layers * self.per_layer, self.arena.capacity / 1e6 if self.arena else 0.0,
                 (time.perf_counter() - t0) * 1e3)

    def use_device(self) -> None:
        """Make the pool's GPU current on the calling thread before any NIXL call: UCX picks its
        links (cuda_ipc over NVLink) from the thread's CUDA context, and a thread without one, or
        with another GPU's, falls back to staged copies."""
        if self.pool.kv.device.type == "cuda":
            torch.cuda.set_device(self.pool.kv.device)

    def staged_bytes(self, num_blocks: int) -> int:
        """Bytes of ``num_blocks`` blocks packed over all layers and every rank of ``pack_ranks``."""
        return len(self.pack_ranks) * self.num_layers * num_blocks * self.block_bytes

    def staged_view(self, ext: Extent, num_blocks: int) -> torch.Tensor:
        """The extent as packed blocks ``[ranks, L, num_blocks, 2, bs, local Hkv, D]`` of the pool's dtype."""
        assert self.arena is not None
        kv = self.pool.kv
        return self.arena.view(ext, (len(self.pack_ranks), self.num_layers, num_blocks) + tuple(kv.shape[2:]), kv.dtype)

    def staged_region(self, ext: Extent, num_blocks: int) -> kpb.NixlStagedRegion:
        """Where ``pack`` put ``num_blocks`` blocks in ``ext``, as a reader addresses it."""
        assert self.arena is not None
        return kpb.NixlStagedRegion(address=self.arena.address + ext.offset, num_blocks=num_blocks,
                                    nbytes=self.staged_bytes(num_blocks), num_ranks=len(self.pack_ranks))

    def pack(self, ext: Extent, block_ids: Sequence[int]) -> None:
        """Source side, in a thread: gather blocks ``block_ids`` (all layers) of every rank of
        ``pack_ranks`` into ``ext``, in that order, and return once the bytes are there (one kernel
        per rank on a side stream of its GPU, then a peer copy for a rank on another GPU than the
        arena; torch's gather on CPU).  The caller holds a read pin on the blocks."""
        n = len(block_ids)
        out = self.staged_view(ext, n)
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        used = []
        for i, r in enumerate(self.pack_ranks):
            kv = self.pool.ranks[r]
            if not kv.is_cuda:
                torch.index_select(kv, 1, ids, out=out[i])
                continue
            stream = self.streams(kv.device)
            with torch.cuda.device(kv.device), torch.cuda.stream(stream):
                idx = ids.to(kv.device)
                if kv.device == out.device:
                    copy_blocks(kv, idx, out[i], torch.arange(n, device=kv.device))
                else:  # the peer copy orders both devices' streams itself
                    out[i].copy_(gather_heads(kv, idx, (0, kv.shape[4])))
            used.append(stream)
        for stream in used:
            stream.synchronize()

    def descs(self, base: int, per_layer: Optional[int] = None, num_layers: Optional[int] = None,
              block_bytes: Optional[int] = None, device_id: Optional[int] = None) -> np.ndarray:
        """[L * P, 3] (address, length, device) of every (layer, block) region of a pool."""
        per_layer = per_layer or self.per_layer
        num_layers = num_layers or self.num_layers
        block_bytes = block_bytes or self.block_bytes
        dev = self.device_id if device_id is None else device_id
        idx = np.arange(num_layers * per_layer, dtype=np.uint64)
        out = np.empty((len(idx), 3), dtype=np.uint64)
        out[:, 0] = np.uint64(base) + idx * np.uint64(block_bytes)
        out[:, 1] = block_bytes
        out[:, 2] = dev
        return out

    def metadata(self) -> kpb.NixlMetadata:
        return kpb.NixlMetadata(agent_name=self.name, agent_metadata=self.agent.get_agent_metadata(),
                                incarnation=self.incarnation, mem_type=self.mem_type, device_id=self.device_id,
                                base_address=self.base, num_layers=self.num_layers, blocks_per_layer=self.per_layer,
                                block_bytes=self.block_bytes,
                                rank_base_addresses=self.rank_bases if len(self.rank_bases) > 1 else [],
                                rank_device_ids=self.rank_devices if len(self.rank_bases) > 1 else [],
                                staging_address=self.arena.address if self.arena else 0,
                                staging_bytes=self.arena.capacity if self.arena else 0)


@dataclass
class NixlPeer:
    """A peer's agent loaded into ours, with its pools' descriptor list prepared (once)."""

    incarnation: str
    agent_name: str
    per_layer: int
    remote: Any
    """The prepared remote descriptor list (every rank's pool, rank-major)."""
    md: kpb.NixlMetadata
    """Its metadata (memory type, devices, pool and staging arena addresses)."""
    bases: list[int] = field(default_factory=list)
    """Each rank's pool address."""
    devices: list[int] = field(default_factory=list)
    """Each rank's device."""

    @property
    def block_bytes(self) -> int:
        """Bytes of one (layer, block) region of one of its ranks' pools."""
        return self.md.block_bytes


@dataclass
class NixlSource:
    """What a pull reads from (``PreparedPull.state``): the peer, and the extent its blocks were
    packed into (None: read from its pools, one region per (layer, block))."""

    peer: NixlPeer
    staged: Optional[kpb.NixlStagedRegion] = None


class NixlRead(BaseTransfer):
    """One posted READ."""

    def __init__(self, agent: NixlAgent, handle: Any, nbytes: int) -> None:
        self.agent = agent
        self.handle = handle
        self.nbytes = nbytes
        self.state = TransferState.RUNNING
        self.released = False

    def _check(self) -> TransferState:
        if self.state is TransferState.RUNNING:
            try:
                st = self.agent.agent.check_xfer_state(self.handle)
            except Exception as exc:  # noqa: BLE001 - NIXL raises on a dead peer (NIXL_ERR_REMOTE_DISCONNECT)
                st, self.error = "ERR", f"NIXL read failed: {exc!r}"
            if st == "DONE":
                self.state = TransferState.DONE
            elif st != "PROC":
                self.error = self.error or f"NIXL read state {st}"
                self.state = TransferState.FAILED
        return self.state

    def poll(self) -> TransferState:
        st = self._check()
        if st is not TransferState.RUNNING:
            self._release()
        return st

    def _release(self) -> bool:
        if not self.released:
            try:
                self.agent.agent.release_xfer_handle(self.handle)
            except Exception:  # noqa: BLE001 - still active and not cancellable: try again later
                return False
            self.released = True
        return True

    def cancel(self) -> bool:
        """NIXL cancels an active transfer when its handle is released; until that succeeds the
        READ may still write, so the caller keeps the blocks."""
        self._check()
        if self._release():
            if self.state is TransferState.RUNNING:
                self.state, self.error = TransferState.FAILED, "cancelled"
            return True
        return False


READ_KINDS = ("unstaged", "staged", "direct", "fallback")
"""Kinds of READ a pull posts (``kv_nixl_reads_total{kind}``; ``pdmesh.transport.nixl_pull``)."""


class NixlKVTransport(OneSidedTransport):
    name = "nixl"

    def __init__(self, channels: ChannelPool, agent: NixlAgent, faults: Optional[FaultPlan] = None,
                 metrics: Optional[ServiceMetrics] = None) -> None:
        super().__init__(channels, faults)
        self.agent = agent
        self.metrics = metrics
        """``kv_nixl_reads_total``, ``kv_nixl_staging_fallbacks_total``; None in tests without metrics."""
        self.reads_total: dict[str, int] = dict.fromkeys(READ_KINDS, 0)
        """READs posted, by kind (counters, as ``kv_nixl_reads_total``)."""

    def count(self, kind: str) -> None:
        """One READ of ``kind`` (one of ``READ_KINDS``) is being posted."""
        self.reads_total[kind] += 1
        if self.metrics is not None:
            self.metrics.inc("kv_nixl_reads_total", kind=kind)

    def arena_full(self, nbytes: int) -> None:
        """This worker's arena had no room for a landing buffer of ``nbytes``: counted, logged."""
        arena = self.agent.arena
        assert arena is not None
        if self.metrics is not None:
            self.metrics.inc("kv_nixl_staging_fallbacks_total", side="destination")
        log.info("NIXL staging arena full (%d of %d bytes in use, %d wanted)", arena.used_bytes, arena.capacity, nbytes)

    @property
    def stage_reads(self) -> bool:
        return self.agent.arena is not None

    async def _fetch_peer(self, desc: pb.KVDescriptor, timeout: float, metadata: tuple) -> tuple[str, kpb.NixlMetadata]:
        md = await self.channels.stub(desc.address, kgrpc.KVTransferStub).GetNixlMetadata(
            kpb.NixlMetadataRequest(), timeout=timeout, metadata=metadata)
        return md.incarnation, md

    def _open_peer(self, md: kpb.NixlMetadata) -> NixlPeer:
        """Load the peer's agent and prepare its pools' descriptor list (once per incarnation)."""
        a = self.agent
        a.use_device()
        if md.num_layers != a.num_layers:
            raise TransferError(f"NIXL peer pool differs: {md.num_layers} layers, not {a.num_layers}")
        name = a.agent.add_remote_agent(md.agent_metadata)
        name = name.decode() if isinstance(name, bytes) else name
        bases = list(md.rank_base_addresses) or [md.base_address]
        devices = list(md.rank_device_ids) or [md.device_id]
        descs = np.concatenate([a.descs(b, md.blocks_per_layer, block_bytes=md.block_bytes, device_id=d)
                                for b, d in zip(bases, devices)])
        remote = a.agent.prep_xfer_dlist(name, descs, md.mem_type)
        try:
            a.agent.make_connection(name)
        except Exception as exc:  # noqa: BLE001 - optional: the first READ connects otherwise
            log.info("NIXL make_connection to %s: %r", name, exc)
        return NixlPeer(md.incarnation, name, md.blocks_per_layer, remote, md, bases, devices)

    def _forget_peer(self, peer: NixlPeer) -> None:
        try:
            self.agent.agent.release_dlist_handle(peer.remote)
            self.agent.agent.remove_remote_agent(peer.agent_name)
        except Exception as exc:  # noqa: BLE001 - best effort: the process is gone anyway
            log.info("forgetting NIXL peer %s: %r", peer.agent_name, exc)

    def _peer_blocks(self, peer: NixlPeer) -> int:
        return peer.per_layer

    def _pull_state(self, desc: pb.KVDescriptor, peer: NixlPeer, pin: ReadPin, src_block_ids: Sequence[int]) -> NixlSource:
        from pdmesh.transport.nixl_pull import check_staged

        staged = pin.staged
        if staged is not None:
            why = check_staged(staged, peer.md, len(read_ranks(desc.layout)), len(src_block_ids))
            if why:  # a peer bug: never read outside what it packed; its pool is still pinned
                log.warning("ignoring the staged region from %s (%s): reading block by block", peer.agent_name, why)
                staged = None
        return NixlSource(peer, staged)

    def launch(self, source: NixlSource, ranks: list[int], pieces: list[Piece], src: Sequence[int], dst: Sequence[int],
               pool: KVCachePool, first: int = 0) -> BaseTransfer:
        from pdmesh.transport.nixl_pull import launch_pull

        return launch_pull(self, source, ranks, pieces, src, dst, pool, first)

    def post(self, make_handle: Callable[[], Any], nbytes: int) -> NixlRead:
        """Post the READ that ``make_handle`` prepares (engine thread); TransferError if NIXL
        cannot prepare it, a FAILED transfer if it refuses to post it."""
        a = self.agent
        a.use_device()
        try:
            handle = make_handle()
        except Exception as exc:  # noqa: BLE001 - NIXL's own errors: the pull fails
            raise TransferError(f"NIXL could not prepare the read: {exc!r}") from exc
        xfer = NixlRead(a, handle, nbytes)
        try:
            st = a.agent.transfer(handle)
        except Exception as exc:  # noqa: BLE001 - e.g. NIXL_ERR_REMOTE_DISCONNECT: nothing was posted
            xfer.state, xfer.error = TransferState.FAILED, f"NIXL read failed: {exc!r}"
            xfer._release()
            return xfer
        if st == "ERR":
            xfer.state, xfer.error = TransferState.FAILED, "NIXL refused the read"
            xfer._release()
        return xfer

    def read(self, peer: NixlPeer, src: Sequence[int], dst: Sequence[int], src_rank: int = 0, dst_rank: int = 0) -> NixlRead:
        """Post one READ of blocks ``src`` of the peer's rank ``src_rank`` into blocks ``dst`` of local
        rank ``dst_rank``'s pool (all layers), one region per (layer, block) over the prepared lists."""
        a = self.agent
        local_idx = region_index(a.num_layers, a.per_layer, dst, dst_rank).astype(np.int32)
        remote_idx = region_index(a.num_layers, peer.per_layer, src, src_rank).astype(np.int32)
        return self.post(lambda: a.agent.make_prepped_xfer("READ", a.local, local_idx, peer.remote, remote_idx),
                         len(local_idx) * a.block_bytes)

    def read_regions(self, peer: NixlPeer, local: np.ndarray, local_device: int, remote: np.ndarray,
                     remote_device: int) -> NixlRead:
        """Post one READ of paired ``[k, 2]`` (address, length) rows: the peer's registered memory
        (on its device ``remote_device``) into this worker's (on ``local_device``); rows that
        continue each other on both sides are merged first."""
        from pdmesh.transport.nixl_pull import merge_regions

        a = self.agent
        local, remote = merge_regions(local, remote)

        def descs(rows: np.ndarray, device_id: int) -> np.ndarray:
            out = np.empty((len(rows), 3), dtype=np.uint64)
            out[:, :2] = rows
            out[:, 2] = device_id
            return out

        def make() -> Any:
            return a.agent.initialize_xfer("READ", a.agent.get_xfer_descs(descs(local, local_device), a.mem_type),
                                           a.agent.get_xfer_descs(descs(remote, remote_device), peer.md.mem_type),
                                           peer.agent_name)

        return self.post(make, int(local[:, 1].sum()))
