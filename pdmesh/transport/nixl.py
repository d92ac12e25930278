"""``nixl`` KV transport: one-sided READs with NIXL (UCX underneath: RDMA, NVLink, TCP, shared
memory), for KV between hosts; host memory (CPU pools) and GPU memory alike.

Each worker that offers ``nixl`` has one ``NixlAgent``: it registers the whole KV pool once and
prepares a descriptor list with one entry per (layer, block) — the pool's layout
``[L, P, 2, bs, Hkv, D]`` makes each such region contiguous — indexed ``l * P + b`` (with tensor
parallelism every rank's pool, mapped by rank 0, registered by rank 0's one agent, indexed
``(r * L + l) * P + b``).  Between workers of different TP sizes a destination rank's heads are not
contiguous in a block, so a source rank's blocks are READ whole into a staging buffer registered
for that pull and then landed head by head (``KVCachePool.land``); equal TP sizes READ straight
into the pool.  Peers get the
agent's metadata through ``KVTransfer.GetNixlMetadata`` (with the process incarnation) and load it
once per incarnation: a restarted peer has a new one, so stale metadata is dropped and fetched
again.  A request's pull is then one READ: ``make_prepped_xfer`` with index arrays computed by
numpy (no per-block Python work), started on the engine thread and polled with NIXL's own state
check.  ``prepare`` pins the source lease (``BeginRead``); the hand-off ends the read when the
transfer has stopped.  ``UCX_TLS`` chooses the links (e.g. ``UCX_TLS=tcp``), read by UCX itself.

Install: ``pip install nixl-cu12`` (imports and moves host memory without a GPU) or ``nixl-cu13``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

import torch

from pdmesh.kv.pool import KVCachePool
from pdmesh.kv.shards import Piece
from pdmesh.rpc.channels import ChannelPool
from pdmesh.transport.base import BaseTransfer, TransferError, TransferState
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.one_sided import OneSidedTransport
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


class NixlAgent:
    """This worker's NIXL agent, with its KV pool registered once."""

    def __init__(self, name: str, pool: KVCachePool, incarnation: str, num_threads: int = 0) -> None:
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
        self.rank_bases = [t.data_ptr() for t in pool.ranks]
        self.rank_devices = [(t.device.index or 0) if t.device.type == "cuda" else 0 for t in pool.ranks]
        t0 = time.perf_counter()
        self.regs = [self.agent.register_memory(t) for t in pool.ranks]
        self.local = self.agent.prep_xfer_dlist("", np.concatenate([
            self.descs(b, device_id=d) for b, d in zip(self.rank_bases, self.rank_devices)]), self.mem_type)
        log.info("NIXL agent %s: registered %d KV pool(s) of %.1f MB (%s, %d regions) in %.1f ms", name, len(pool.ranks),
                 kv.numel() * kv.element_size() / 1e6, self.mem_type, len(pool.ranks) * self.num_layers * self.per_layer,
                 (time.perf_counter() - t0) * 1e3)

    def use_device(self) -> None:
        """Make the pool's GPU current on the calling thread before any NIXL call: UCX picks its
        links (cuda_ipc over NVLink) from the thread's CUDA context, and a thread without one, or
        with another GPU's, falls back to staged copies."""
        if self.pool.kv.device.type == "cuda":
            import torch

            torch.cuda.set_device(self.pool.kv.device)

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
                                rank_device_ids=self.rank_devices if len(self.rank_bases) > 1 else [])


@dataclass
class NixlPeer:
    """A peer's agent loaded into ours, with its pools' descriptor list prepared (once)."""

    incarnation: str
    agent_name: str
    per_layer: int
    remote: Any
    """The prepared remote descriptor list (every rank's pool, rank-major)."""
    block_bytes: int = 0
    """Bytes of one (layer, block) region of one of its ranks' pools."""


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


class _Staged:
    """A source rank's blocks READ whole into a buffer registered for this pull, then landed."""

    def __init__(self, rank: int, buffer: torch.Tensor, reg: Any, dlist: Any) -> None:
        self.rank, self.buffer, self.reg, self.dlist = rank, buffer, reg, dlist
        self.read: Optional[NixlRead] = None
        self.landed: Optional[torch.cuda.Event] = None
        self.done = False


class NixlPull(BaseTransfer):
    """A pull's READs (straight into the pool, or into staging buffers whose heads are then landed
    on the ranks that hold them).  DONE when every READ is and every staged buffer has landed;
    staging buffers are deregistered once nothing can write them any more."""

    def __init__(self, agent: NixlAgent, reads: list[NixlRead], staged: list[_Staged], land) -> None:
        self.agent = agent
        self.reads = reads
        self.staged = staged
        self._land = land
        """(staged) -> CUDA event of the landing copies, or None when done synchronously (CPU)."""
        self.nbytes = sum(r.nbytes for r in reads)

    def poll(self) -> TransferState:
        running = False
        for r in self.reads:
            st = r.poll()
            if st is TransferState.FAILED:
                self.error = r.error
                self.cancel()
                return TransferState.FAILED
            running |= st is TransferState.RUNNING
        if running:
            return TransferState.RUNNING
        for s in self.staged:
            if s.landed is None and not s.done:
                ev = self._land(s)
                s.done, s.landed = ev is None, ev
            if s.landed is not None and s.landed.query():
                s.done, s.landed = True, None
        if all(s.done for s in self.staged):
            self._free_staging()
            return TransferState.DONE
        return TransferState.RUNNING

    def cancel(self) -> bool:
        stopped = all([r.cancel() for r in self.reads])
        landing = any(s.landed is not None and not s.landed.query() for s in self.staged)
        if stopped and not landing:
            self._free_staging()
            return True
        return False

    def _free_staging(self) -> None:
        for s in self.staged:
            if s.reg is not None:
                try:
                    self.agent.agent.release_dlist_handle(s.dlist)
                    self.agent.agent.deregister_memory(s.reg)
                except Exception as exc:  # noqa: BLE001 - best effort; the buffer is freed with the object
                    log.info("releasing a NIXL staging buffer: %r", exc)
                s.reg = s.dlist = None


class NixlKVTransport(OneSidedTransport):
    name = "nixl"

    def __init__(self, channels: ChannelPool, agent: NixlAgent, faults: Optional[FaultPlan] = None) -> None:
        super().__init__(channels, faults)
        self.agent = agent

    async def _fetch_peer(self, desc, timeout: float, metadata: tuple) -> tuple[str, kpb.NixlMetadata]:
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
        return NixlPeer(md.incarnation, name, md.blocks_per_layer, remote, md.block_bytes)

    def _forget_peer(self, peer: NixlPeer) -> None:
        try:
            self.agent.agent.release_dlist_handle(peer.remote)
            self.agent.agent.remove_remote_agent(peer.agent_name)
        except Exception as exc:  # noqa: BLE001 - best effort: the process is gone anyway
            log.info("forgetting NIXL peer %s: %r", peer.agent_name, exc)

    def _peer_blocks(self, peer: NixlPeer) -> int:
        return peer.per_layer

    def launch(self, peer: NixlPeer, ranks: list[int], pieces: list[Piece], src: Sequence[int], dst: Sequence[int],
               pool: KVCachePool) -> NixlPull:
        """Per source rank: one READ straight into the destination rank's pool when that rank takes all
        of its heads and they are all it holds (equal TP sizes), else one READ into a staging buffer."""
        reads, staged = [], []
        try:
            for r in ranks:
                mine = [p for p in pieces if p.src_rank == r]
                heads = pool.layout.local_kv_heads
                if (len(mine) == 1 and mine[0].num_heads == heads and mine[0].dst_heads == (0, heads)
                        and peer.block_bytes == self.agent.block_bytes):
                    reads.append(self.read(peer, src, dst, src_rank=r, dst_rank=mine[0].dst_rank))
                else:
                    st = self._stage(peer, r, len(src), pool, mine)
                    staged.append(st)
                    st.read = self._post(peer, st.dlist, np.arange(st.buffer.shape[0] * len(src)), src, r,
                                         st.buffer.numel() * st.buffer.element_size())
                    reads.append(st.read)
        except BaseException:
            NixlPull(self.agent, reads, staged, None).cancel()
            raise
        return NixlPull(self.agent, reads, staged, lambda s: self._land_staged(s, pieces, dst, pool))

    def _stage(self, peer: NixlPeer, rank: int, n: int, pool: KVCachePool, mine: list[Piece]) -> _Staged:
        """A registered buffer ``[L, n, 2, bs, source heads, D]`` on the first destination rank's device."""
        lay = pool.layout
        heads = peer.block_bytes // (2 * lay.block_size * lay.head_dim * lay.elem_bytes)
        device = pool.ranks[mine[0].dst_rank].device
        buf = torch.empty((lay.num_layers, n, 2, lay.block_size, heads, lay.head_dim), dtype=pool.kv.dtype, device=device)
        a = self.agent
        reg = a.agent.register_memory(buf)
        dev = (device.index or 0) if device.type == "cuda" else 0
        dlist = a.agent.prep_xfer_dlist("", a.descs(buf.data_ptr(), n, block_bytes=peer.block_bytes, device_id=dev), a.mem_type)
        return _Staged(rank, buf, reg, dlist)

    @staticmethod
    def _land_staged(s: _Staged, pieces: list[Piece], dst: Sequence[int], pool: KVCachePool) -> Optional[torch.cuda.Event]:
        """Write a staged source rank's heads into the ranks that hold them: at once on CPU; on GPUs on
        the staging device's current stream, returning the event to poll."""
        dev = s.buffer.device
        if dev.type != "cuda":
            pool.land(pieces, s.rank, list(dst), s.buffer)
            return None
        with torch.cuda.device(dev):
            pool.land(pieces, s.rank, list(dst), s.buffer)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
        return ev

    def read(self, peer: NixlPeer, src: Sequence[int], dst: Sequence[int], src_rank: int = 0, dst_rank: int = 0) -> NixlRead:
        """Post one READ of blocks ``src`` of the peer's rank ``src_rank`` into blocks ``dst`` of local
        rank ``dst_rank``'s pool (all layers)."""
        a = self.agent
        local_idx = region_index(a.num_layers, a.per_layer, dst, dst_rank)
        return self._post(peer, a.local, local_idx, src, src_rank, len(local_idx) * a.block_bytes)

    def _post(self, peer: NixlPeer, local_list: Any, local_idx: np.ndarray, src: Sequence[int], src_rank: int,
              nbytes: int) -> NixlRead:
        a = self.agent
        a.use_device()
        remote_idx = region_index(a.num_layers, peer.per_layer, src, src_rank)
        try:
            handle = a.agent.make_prepped_xfer("READ", local_list, np.asarray(local_idx).astype(np.int32), peer.remote,
                                               remote_idx.astype(np.int32))
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
