"""``nixl`` KV transport: one-sided READs with NIXL (UCX underneath: RDMA, NVLink, TCP, shared
memory), for KV between hosts; host memory (CPU pools) and GPU memory alike.

Each worker that offers ``nixl`` has one ``NixlAgent``: it registers the whole KV pool once and
prepares a descriptor list with one entry per (layer, block) — the pool's layout
``[L, P, 2, bs, Hkv, D]`` makes each such region contiguous — indexed ``l * P + b``.  Peers get the
agent's metadata through ``KVTransfer.GetNixlMetadata`` (with the process incarnation) and load it
once per incarnation: a restarted peer has a new one, so stale metadata is dropped and fetched
again.  A request's pull is then one READ: ``make_prepped_xfer`` with index arrays computed by
numpy (no per-block Python work), started on the engine thread and polled with NIXL's own state
check.  ``prepare`` pins the source lease (``BeginRead``); the hand-off ends the read when the
transfer has stopped.  ``UCX_TLS`` chooses the links (e.g. ``UCX_TLS=tcp``), read by UCX itself.

Staged pulls (``--nixl-staging-mb`` > 0 on both sides; ``pdmesh.transport.staging``): each agent
also registers a staging arena once.  The reader asks ``BeginRead`` to stage; the source packs the
blocks into one extent (one gather) and answers where it is; the reader posts one READ of it (one
per layer when it reads a piece) into an extent of its own arena and scatters it into its blocks
with one kernel, or READs straight into its blocks when they are consecutive
(``pdmesh.transport.nixl_staged``).  A full arena on either side falls back to one region per
(layer, block), as unstaged.

Install: ``pip install nixl-cu12`` (imports and moves host memory without a GPU) or ``nixl-cu13``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pdmesh.kv.pool import KVCachePool
from pdmesh.rpc.channels import ChannelPool
from pdmesh.transport.base import BaseTransfer, TransferError, TransferState
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.one_sided import OneSidedTransport, ReadPin
from pdmesh.transport.staging import Extent, StagingArena
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


def region_index(num_layers: int, per_layer: int, block_ids: Sequence[int]) -> np.ndarray:
    """Descriptor indices of ``block_ids`` over all layers, layer-major: [L * len(block_ids)]."""
    b = np.asarray(block_ids, dtype=np.int64)
    return (np.arange(num_layers, dtype=np.int64)[:, None] * per_layer + b[None, :]).ravel()


class NixlAgent:
    """This worker's NIXL agent, with its KV pool registered once."""

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
        self.device_id = (kv.device.index or 0) if kv.device.type == "cuda" else 0
        self.num_layers, self.per_layer = kv.shape[0], kv.shape[1]
        self.block_bytes = kv[0, 0].numel() * kv.element_size()
        self.base = kv.data_ptr()
        t0 = time.perf_counter()
        self.reg = self.agent.register_memory(kv)
        self.local = self.agent.prep_xfer_dlist("", self.descs(self.base), self.mem_type)
        self.arena: Optional[StagingArena] = None
        """The staging arena (``--nixl-staging-mb``; None: staged pulls off), registered once."""
        if staging_bytes > 0:
            self.arena = StagingArena(staging_bytes, kv.device)
            self.arena_reg = self.agent.register_memory(self.arena.buf)
        self._stream = None
        log.info("NIXL agent %s: registered a %.1f MB KV pool (%s, %d regions) and a %.1f MB staging arena in %.1f ms",
                 name, kv.numel() * kv.element_size() / 1e6, self.mem_type, self.num_layers * self.per_layer,
                 self.arena.capacity / 1e6 if self.arena else 0.0, (time.perf_counter() - t0) * 1e3)

    def use_device(self) -> None:
        """Make the pool's GPU current on the calling thread before any NIXL call: UCX picks its
        links (cuda_ipc over NVLink) from the thread's CUDA context, and a thread without one, or
        with another GPU's, falls back to staged copies."""
        if self.pool.kv.device.type == "cuda":
            import torch

            torch.cuda.set_device(self.pool.kv.device)

    def staged_bytes(self, num_blocks: int) -> int:
        """Bytes of ``num_blocks`` blocks packed over all layers."""
        return self.num_layers * num_blocks * self.block_bytes

    def staged_view(self, ext: Extent, num_blocks: int):
        """The extent as packed blocks ``[L, num_blocks, 2, bs, Hkv, D]`` of the pool's dtype."""
        assert self.arena is not None
        kv = self.pool.kv
        return self.arena.view(ext, (self.num_layers, num_blocks) + tuple(kv.shape[2:]), kv.dtype)

    def side_stream(self):
        """A high-priority stream of the pool's GPU for the gathers and scatters of staged pulls."""
        if self._stream is None:
            from pdmesh.transport.cuda_ipc import copy_stream

            self._stream = copy_stream(self.pool.kv.device)
        return self._stream

    def pack(self, ext: Extent, block_ids: Sequence[int]) -> None:
        """Source side, in a thread: gather blocks ``block_ids`` (all layers) into ``ext``, in that
        order, and return once the bytes are there (one kernel on a side stream of the pool's GPU;
        torch's gather on CPU).  The caller holds a read pin on the blocks."""
        import torch

        from pdmesh.kv.copy import copy_blocks

        kv, n = self.pool.kv, len(block_ids)
        out = self.staged_view(ext, n)
        idx = torch.tensor(list(block_ids), dtype=torch.int64)
        if not kv.is_cuda:
            torch.index_select(kv, 1, idx, out=out)
            return
        stream = self.side_stream()
        with torch.cuda.device(kv.device), torch.cuda.stream(stream):
            copy_blocks(kv, idx.to(kv.device), out, torch.arange(n, device=kv.device))
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()

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
                                block_bytes=self.block_bytes, staging_address=self.arena.address if self.arena else 0,
                                staging_bytes=self.arena.capacity if self.arena else 0)


@dataclass
class NixlPeer:
    """A peer's agent loaded into ours, with its pool's descriptor list prepared (once)."""

    incarnation: str
    agent_name: str
    per_layer: int
    remote: Any
    """The prepared remote descriptor list."""
    md: Any = None
    """Its ``NixlMetadata`` (memory type, device, pool and staging arena addresses)."""


@dataclass
class NixlSource:
    """What a pull reads from: the peer, and the region its blocks were packed into (None: read
    from its pool, one region per (layer, block))."""

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


class NixlKVTransport(OneSidedTransport):
    name = "nixl"

    def __init__(self, channels: ChannelPool, agent: NixlAgent, faults: Optional[FaultPlan] = None, metrics=None) -> None:
        super().__init__(channels, faults)
        self.agent = agent
        self.metrics = metrics
        """``ServiceMetrics`` (``kv_nixl_reads_total``, ``kv_nixl_staging_fallbacks_total``), or None."""
        self.reads_total: dict[str, int] = {"unstaged": 0, "staged": 0, "direct": 0, "fallback": 0}
        """READs posted by kind (counters): from the peer's pool block by block ('unstaged'), from a
        packed region into an extent here ('staged') or straight into consecutive blocks
        ('direct'), or block by block from a packed region because this arena was full ('fallback')."""

    def count(self, kind: str) -> None:
        """One READ of ``kind`` (a key of ``reads_total``) is being posted."""
        self.reads_total[kind] += 1
        if self.metrics is not None:
            self.metrics.inc("kv_nixl_reads_total", kind=kind)
            if kind == "fallback":
                self.metrics.inc("kv_nixl_staging_fallbacks_total", side="destination")

    @property
    def stage_reads(self) -> bool:
        return self.agent.arena is not None

    async def _fetch_peer(self, address: str, timeout: float, metadata: tuple) -> tuple[str, kpb.NixlMetadata]:
        md = await self.channels.stub(address, kgrpc.KVTransferStub).GetNixlMetadata(kpb.NixlMetadataRequest(),
                                                                                     timeout=timeout, metadata=metadata)
        return md.incarnation, md

    def _open_peer(self, md: kpb.NixlMetadata) -> NixlPeer:
        """Load the peer's agent and prepare its pool's descriptor list (once per incarnation)."""
        a = self.agent
        a.use_device()
        if (md.num_layers, md.block_bytes) != (a.num_layers, a.block_bytes):
            raise TransferError(f"NIXL peer pool differs: {md.num_layers} layers x {md.block_bytes} B blocks")
        name = a.agent.add_remote_agent(md.agent_metadata)
        name = name.decode() if isinstance(name, bytes) else name
        remote = a.agent.prep_xfer_dlist(name, a.descs(md.base_address, md.blocks_per_layer, device_id=md.device_id), md.mem_type)
        try:
            a.agent.make_connection(name)
        except Exception as exc:  # noqa: BLE001 - optional: the first READ connects otherwise
            log.info("NIXL make_connection to %s: %r", name, exc)
        return NixlPeer(md.incarnation, name, md.blocks_per_layer, remote, md)

    def _forget_peer(self, peer: NixlPeer) -> None:
        try:
            self.agent.agent.release_dlist_handle(peer.remote)
            self.agent.agent.remove_remote_agent(peer.agent_name)
        except Exception as exc:  # noqa: BLE001 - best effort: the process is gone anyway
            log.info("forgetting NIXL peer %s: %r", peer.agent_name, exc)

    def _peer_blocks(self, peer: NixlPeer) -> int:
        return peer.per_layer

    def _pull_state(self, peer: NixlPeer, pin: ReadPin, src_block_ids: Sequence[int]) -> NixlSource:
        from pdmesh.transport.nixl_staged import check_staged

        staged = pin.staged
        if staged is not None:
            why = check_staged(staged, peer.md, self.agent, len(src_block_ids))
            if why:  # a peer bug: never read outside what it packed; its pool is still pinned
                log.warning("ignoring the staged region from %s (%s): reading block by block", peer.agent_name, why)
                staged = None
        return NixlSource(peer, staged)

    def launch(self, source: NixlSource, src: Sequence[int], dst: Sequence[int], pool: KVCachePool,
               first: int = 0) -> BaseTransfer:
        if source.staged is None:
            return self.read(source.peer, src, dst)
        from pdmesh.transport.nixl_staged import read_staged

        return read_staged(self, source, first, dst)

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

    def read(self, peer: NixlPeer, src: Sequence[int], dst: Sequence[int]) -> NixlRead:
        """Post one READ of blocks ``src`` of the peer's pool into local blocks ``dst`` (all layers),
        one region per (layer, block) over the prepared lists."""
        a = self.agent
        local_idx = region_index(a.num_layers, a.per_layer, dst).astype(np.int32)
        remote_idx = region_index(a.num_layers, peer.per_layer, src).astype(np.int32)
        self.count("unstaged")
        return self.post(lambda: a.agent.make_prepped_xfer("READ", a.local, local_idx, peer.remote, remote_idx),
                         len(local_idx) * a.block_bytes)
