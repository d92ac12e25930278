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

Install: ``pip install nixl-cu12`` (imports and moves host memory without a GPU) or ``nixl-cu13``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from pdmesh.kv.pool import KVCachePool
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


def region_index(num_layers: int, per_layer: int, block_ids: Sequence[int]) -> np.ndarray:
    """Descriptor indices of ``block_ids`` over all layers, layer-major: [L * len(block_ids)]."""
    b = np.asarray(block_ids, dtype=np.int64)
    return (np.arange(num_layers, dtype=np.int64)[:, None] * per_layer + b[None, :]).ravel()


class NixlAgent:
    """This worker's NIXL agent, with its KV pool registered once."""

    def __init__(self, name: str, pool: KVCachePool, incarnation: str) -> None:
        api = import_nixl()
        self.api = api
        cfg = api.nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"],
                                    sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = api.nixl_agent(name, cfg)
        if "UCX" not in self.agent.backends:
            raise TransferError("NIXL has no UCX backend here")
        self.name = name
        self.pool = pool
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
        log.info("NIXL agent %s: registered a %.1f MB KV pool (%s, %d regions) in %.1f ms", name, kv.numel() * kv.element_size() / 1e6,
                 self.mem_type, self.num_layers * self.per_layer, (time.perf_counter() - t0) * 1e3)

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
                                block_bytes=self.block_bytes)


@dataclass
class NixlPeer:
    """A peer's agent loaded into ours, with its pool's descriptor list prepared (once)."""

    incarnation: str
    agent_name: str
    per_layer: int
    remote: Any
    """The prepared remote descriptor list."""


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

    def __init__(self, channels: ChannelPool, agent: NixlAgent, faults: Optional[FaultPlan] = None) -> None:
        super().__init__(channels, faults)
        self.agent = agent

    async def _fetch_peer(self, address: str, timeout: float, metadata: tuple) -> tuple[str, kpb.NixlMetadata]:
        md = await self.channels.stub(address, kgrpc.KVTransferStub).GetNixlMetadata(kpb.NixlMetadataRequest(),
                                                                                     timeout=timeout, metadata=metadata)
        return md.incarnation, md

    def _open_peer(self, md: kpb.NixlMetadata) -> NixlPeer:
        """Load the peer's agent and prepare its pool's descriptor list (once per incarnation)."""
        a = self.agent
        if (md.num_layers, md.block_bytes) != (a.num_layers, a.block_bytes):
            raise TransferError(f"NIXL peer pool differs: {md.num_layers} layers x {md.block_bytes} B blocks")
        name = a.agent.add_remote_agent(md.agent_metadata)
        name = name.decode() if isinstance(name, bytes) else name
        remote = a.agent.prep_xfer_dlist(name, a.descs(md.base_address, md.blocks_per_layer, device_id=md.device_id), md.mem_type)
        try:
            a.agent.make_connection(name)
        except Exception as exc:  # noqa: BLE001 - optional: the first READ connects otherwise
            log.info("NIXL make_connection to %s: %r", name, exc)
        return NixlPeer(md.incarnation, name, md.blocks_per_layer, remote)

    def _forget_peer(self, peer: NixlPeer) -> None:
        try:
            self.agent.agent.release_dlist_handle(peer.remote)
            self.agent.agent.remove_remote_agent(peer.agent_name)
        except Exception as exc:  # noqa: BLE001 - best effort: the process is gone anyway
            log.info("forgetting NIXL peer %s: %r", peer.agent_name, exc)

    def _peer_blocks(self, peer: NixlPeer) -> int:
        return peer.per_layer

    def launch(self, peer: NixlPeer, src: Sequence[int], dst: Sequence[int], pool: KVCachePool) -> "NixlRead":
        return self.read(peer, src, dst)

    def read(self, peer: NixlPeer, src: Sequence[int], dst: Sequence[int]) -> NixlRead:
        """Post one READ of blocks ``src`` of the peer into local blocks ``dst`` (all layers)."""
        a = self.agent
        local_idx = region_index(a.num_layers, a.per_layer, dst)
        remote_idx = region_index(a.num_layers, peer.per_layer, src)
        nbytes = len(local_idx) * a.block_bytes
        try:
            handle = a.agent.make_prepped_xfer("READ", a.local, local_idx.astype(np.int32), peer.remote,
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
