"""What the one-sided transports (``cuda_ipc``, ``nixl``) share: a peer loaded once per process
incarnation, and pulls under a read pin on the source lease.

``prepare`` (event loop): the peer (fetched over ``KVTransfer`` and opened in a thread the first
time; fetched again when the descriptor names a new incarnation, the old one forgotten — a stale
handle or stale metadata is never used), then ``BeginRead``.  The pull's deadline is the earlier of
its timeout and the pin: a copy that completes later is not trusted.  ``start`` (engine thread):
``launch`` of the subclass, or piece by piece when slowed by fault injection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import grpc

from pdmesh.kv.pool import KVCachePool
from pdmesh.kv.shards import Piece
from pdmesh.rpc.channels import ChannelPool
from pdmesh.transport.base import BaseKVTransport, BaseTransfer, PacedTransfer, PreparedPull, TransferError, read_ranks
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.servicer import blocks_per_chunk
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import kv_transfer_pb2 as kpb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc

log = logging.getLogger(__name__)


@dataclass
class ReadPin:
    """A source lease pinned for a one-sided read (``KVTransfer.BeginRead``)."""

    read_id: int
    deadline: float
    """time.monotonic() here, no later than the pin on the source (measured from before the call)."""
    staged: Optional[kpb.NixlStagedRegion] = None
    """Where the source packed the blocks (a staged nixl read), valid as long as the pin."""


async def begin_read(channels: ChannelPool, desc: pb.KVDescriptor, src_block_ids: Sequence[int], timeout: float,
                     metadata: tuple = (), stage: bool = False) -> ReadPin:
    """Pin the source lease for a one-sided read of ``src_block_ids`` for at most ``timeout`` s
    (``stage``: and ask the source to pack them into its staging arena)."""
    t0 = time.monotonic()
    try:
        r = await channels.stub(desc.address, kgrpc.KVTransferStub).BeginRead(
            kpb.BeginReadRequest(request_id=desc.request_id, block_ids=list(src_block_ids), max_seconds=timeout,
                                 lease_token=desc.lease_token, num_tokens=desc.num_tokens, prompt_hash=desc.prompt_hash,
                                 stage=stage),
            timeout=min(timeout, 10.0), metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        raise TransferError(f"no read pin from {desc.address}: {exc.code().name}: {exc.details()}") from exc
    return ReadPin(r.read_id, t0 + r.granted_seconds, r.staged if r.HasField("staged") else None)


class OneSidedTransport(BaseKVTransport):
    def __init__(self, channels: ChannelPool, faults: FaultPlan | None = None) -> None:
        self.channels = channels
        self.faults = faults or FaultPlan()
        """Decode side, tests only: 'delay' lands the pull piece by piece."""
        self.peers: dict[str, tuple[str, Any]] = {}
        """Peer address -> (its incarnation, the opened peer)."""
        self.opened_total = 0
        """Peers opened so far (counter): one per peer process, never per request."""
        self._lock = asyncio.Lock()

    @abstractmethod
    async def _fetch_peer(self, desc: pb.KVDescriptor, timeout: float, metadata: tuple) -> tuple[str, Any]:
        """(incarnation, what ``_open_peer`` needs) of the worker ``desc`` names (every tensor-parallel
        rank's pool its layout lists), over ``KVTransfer`` (raises AioRpcError)."""

    @abstractmethod
    def _open_peer(self, raw: Any) -> Any:
        """Make the peer usable (in a thread: may take milliseconds)."""

    def _forget_peer(self, peer: Any) -> None:
        """The peer's process is gone (in a thread)."""

    @abstractmethod
    def _peer_blocks(self, peer: Any) -> int:
        """Blocks in the peer's pool."""

    @property
    def stage_reads(self) -> bool:
        """Whether ``BeginRead`` asks the source to pack the blocks (staged nixl reads)."""
        return False

    def _pull_state(self, desc: pb.KVDescriptor, peer: Any, pin: ReadPin, src_block_ids: Sequence[int]) -> Any:
        """What ``launch`` reads from (``PreparedPull.state``): by default the peer."""
        return peer

    @abstractmethod
    def launch(self, peer: Any, ranks: list[int], pieces: list[Piece], src: Sequence[int], dst: Sequence[int],
               pool: KVCachePool, first: int = 0) -> BaseTransfer:
        """Engine thread: start copying blocks ``src`` of the peer's source ranks ``ranks`` into blocks
        ``dst`` of ``pool``'s ranks, as ``pieces`` say; ``peer`` is ``PreparedPull.state``; ``first``:
        the index of ``src[0]`` in the pull's source blocks (a piece of a slowed pull)."""

    async def peer(self, desc: pb.KVDescriptor, timeout: float, metadata: tuple = ()) -> Any:
        entry = self.peers.get(desc.address)
        if entry is not None and entry[0] == desc.incarnation:
            return entry[1]
        async with self._lock:
            entry = self.peers.get(desc.address)
            if entry is not None and entry[0] == desc.incarnation:
                return entry[1]
            try:
                incarnation, raw = await self._fetch_peer(desc, timeout, metadata)
            except grpc.aio.AioRpcError as exc:
                raise TransferError(f"no {self.name} peer info from {desc.address}: {exc.code().name}: {exc.details()}") from exc
            if incarnation != desc.incarnation:
                raise TransferError(f"stale descriptor: {desc.address} restarted (incarnation {incarnation} != {desc.incarnation})")
            if entry is not None:  # that process is gone
                del self.peers[desc.address]
                await asyncio.to_thread(self._forget_peer, entry[1])
            t0 = time.perf_counter()
            peer = await asyncio.to_thread(self._open_peer, raw)
            self.opened_total += 1
            log.info("opened %s peer %s (%s) in %.1f ms", self.name, desc.address, incarnation, (time.perf_counter() - t0) * 1e3)
            self.peers[desc.address] = (incarnation, peer)
            return peer

    async def prepare(self, desc: pb.KVDescriptor, src_block_ids: Sequence[int], timeout: float,
                      metadata: tuple = ()) -> PreparedPull:
        t0 = time.monotonic()
        peer = await self.peer(desc, timeout, metadata)
        if src_block_ids and max(src_block_ids) >= self._peer_blocks(peer):
            raise TransferError("source block id outside the peer's pool")
        pin = await begin_read(self.channels, desc, src_block_ids, timeout, metadata, stage=self.stage_reads)
        delay = self.faults.delay if self.faults.next_pull() == "delay" else 0.0
        return PreparedPull(desc, list(src_block_ids), min(t0 + timeout, pin.deadline), read_id=pin.read_id, delay=delay,
                            state=self._pull_state(desc, peer, pin, src_block_ids))

    def start(self, prepared: PreparedPull, dst_block_ids: Sequence[int], pool: KVCachePool) -> BaseTransfer:
        pieces = self.check_start(prepared, dst_block_ids, pool)
        ranks = read_ranks(prepared.desc.layout)
        peer, src, dst = prepared.state, list(prepared.src_block_ids), list(dst_block_ids)
        if prepared.delay:
            return PacedTransfer(lambda a, b: self.launch(peer, ranks, pieces, src[a:b], dst[a:b], pool, first=a), len(src),
                                 blocks_per_chunk(pool.layout.block_bytes), prepared.delay)
        return self.launch(peer, ranks, pieces, src, dst, pool)

    async def close(self) -> None:
        for _, peer in list(self.peers.values()):
            await asyncio.to_thread(self._forget_peer, peer)
        self.peers.clear()
