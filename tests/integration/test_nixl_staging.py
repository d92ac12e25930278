"""Staged NIXL pulls, CPU to CPU (DRAM pools, nixl-cu12 over UCX), through the real pieces: a
source ``KVTransferServicer`` on a gRPC server in this process (``BeginRead`` packs the blocks into
its staging arena), a decode ``NixlKVTransport`` (prepare on the loop, start and poll as the engine
does), two NIXL agents with their pools and arenas registered.

Checked: exact bytes for scattered and consecutive destination blocks and for a piece of a pull;
every arena extent back (exact free runs) after each way a lease ends and after a cancelled read;
a full arena on either side falls back to one region per (layer, block), still exact, and counted.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from pdmesh.transport.nixl import nixl_available

pytestmark = pytest.mark.skipif(not nixl_available(), reason="needs NIXL (pip install nixl-cu12)")

from pdmesh.kv.pool import KVCachePool  # noqa: E402
from pdmesh.metrics import ServiceMetrics  # noqa: E402
from pdmesh.models.arch import ModelArch  # noqa: E402
from pdmesh.rpc.channels import ChannelPool  # noqa: E402
from pdmesh.rpc.convert import layout_to_proto  # noqa: E402
from pdmesh.transport.base import TransferState  # noqa: E402
from pdmesh.transport.lease import LeaseTable  # noqa: E402
from pdmesh.transport.one_sided import begin_read  # noqa: E402
from pdmesh.transport.servicer import KVTransferServicer  # noqa: E402
from pdmesh.transport.staging import ALIGN, StagingArena  # noqa: E402
from pdmesh.v1 import common_pb2 as pb  # noqa: E402
from pdmesh.v1 import kv_transfer_pb2 as kpb  # noqa: E402
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc  # noqa: E402

ARCH = ModelArch("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256)
BLOCK = 4
ARENA = 16 * ALIGN
SRC = [9, 2, 14, 5, 11, 0, 7]
"""Scattered source blocks, as after real traffic."""
SCATTERED = [3, 12, 7, 1, 10, 15, 5]
CONSECUTIVE = [4, 5, 6, 7, 8, 9, 10]


def _agent(name: str, fill: bool):
    from pdmesh.transport.nixl import NixlAgent

    pool = KVCachePool(ARCH, 16, BLOCK, torch.float32, torch.device("cpu"))
    if fill:
        pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(7)))
    return NixlAgent(name, pool, name, staging_bytes=ARENA)


@pytest.fixture(scope="module")
def agents():
    """(source agent, destination agent): pools of 16 blocks of 3 layers, 16-page arenas."""
    return _agent("stage-src", True), _agent("stage-dst", False)


class Source:
    """The prefill side: a lease table and the KVTransfer servicer on 127.0.0.1."""

    def __init__(self, agent, ttl: float = 30.0, max_ttl: float = 120.0) -> None:
        self.agent = agent
        self.freed: list[str] = []
        self.leases = LeaseTable(self.freed.append, ttl, max_ttl)
        self.metrics = ServiceMetrics("m", "prefill", "p0")
        self.servicer = KVTransferServicer(agent.pool, self.leases, agent.incarnation, metrics=self.metrics, nixl=agent)

    async def __aenter__(self) -> "Source":
        import grpc

        self.server = grpc.aio.server()
        kgrpc.add_KVTransferServicer_to_server(self.servicer, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        self.channels = ChannelPool()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channels.close()
        await self.server.stop(0)

    def hold(self, rid: str, blocks: list[int]) -> pb.KVDescriptor:
        self.leases.add(rid, blocks, len(blocks) * BLOCK)
        return pb.KVDescriptor(request_id=rid, address=self.address, transport="nixl", block_ids=blocks,
                               num_tokens=len(blocks) * BLOCK, layout=layout_to_proto(self.agent.pool.layout),
                               incarnation=self.agent.incarnation)

    async def end_read(self, rid: str, read_id: int) -> None:
        await self.channels.stub(self.address, kgrpc.KVTransferStub).EndRead(kpb.EndReadRequest(request_id=rid, read_id=read_id))

    def fallbacks(self) -> float:
        return self.metrics.registry.get_sample_value("pdmesh:kv_nixl_staging_fallbacks_total",
                                                      {**self.metrics.base, "side": "source"}) or 0.0


def _transport(dst_agent):
    from pdmesh.transport.nixl import NixlKVTransport

    return NixlKVTransport(ChannelPool(), dst_agent, metrics=ServiceMetrics("m", "decode", "d0"))


def _run(xfer, timeout: float = 10.0) -> TransferState:
    """Poll a transfer to its end as the engine's connector does (bounded)."""
    t0 = time.monotonic()
    while (st := xfer.poll()) is TransferState.RUNNING:
        assert time.monotonic() - t0 < timeout, "the transfer did not end"
        time.sleep(0.001)
    return st


def _exact(src_agent, dst_agent, src: list[int], dst: list[int]) -> None:
    assert torch.equal(dst_agent.pool.kv[:, dst], src_agent.pool.kv[:, src])
    untouched = sorted(set(range(dst_agent.pool.kv.shape[1])) - set(dst))
    assert not dst_agent.pool.kv[:, untouched].any(), "a block outside the destination was written"


def _taken(agent, num_blocks: int) -> int:
    """Arena bytes an extent of ``num_blocks`` packed blocks takes (rounded up to ALIGN)."""
    return -(-agent.staged_bytes(num_blocks) // ALIGN) * ALIGN


def _all_free(agent) -> None:
    assert agent.arena.free_extents() == [(0, agent.arena.capacity)] and agent.arena.used_bytes == 0


def _pull(agents, dst: list[int], kind: str, src_full: bool = False) -> tuple[float, dict]:
    """One whole pull of SRC into ``dst``; returns (source fallbacks, the transport's READ counts)."""
    src_agent, dst_agent = agents
    dst_agent.pool.kv.zero_()
    tr = _transport(dst_agent)
    dst_free = dst_agent.arena.free_extents()

    async def main():
        async with Source(src_agent) as s:
            desc = s.hold("r", SRC)
            prepared = await tr.prepare(desc, SRC, 10.0)
            assert (prepared.state.staged is None) == src_full
            if not src_full:  # the packed extent belongs to the lease now
                assert src_agent.arena.used_bytes == _taken(src_agent, len(SRC))
            st = _run(tr.start(prepared, dst, dst_agent.pool))
            assert st is TransferState.DONE
            assert dst_agent.arena.free_extents() == dst_free  # its extent went back when the scatter ran
            await s.end_read("r", prepared.read_id)
            assert s.freed == ["r"] and s.leases.get("r") is None
            await tr.close()
            return s.fallbacks()

    fallbacks = asyncio.run(main())
    _exact(src_agent, dst_agent, SRC, dst)
    assert tr.reads_total[kind] == 1 and sum(tr.reads_total.values()) == 1, tr.reads_total
    return fallbacks, tr


def test_staged_pull_of_scattered_blocks_is_exact_and_frees_both_extents(agents):
    fallbacks, _ = _pull(agents, SCATTERED, "staged")
    assert fallbacks == 0
    _all_free(agents[0])


def test_staged_pull_into_consecutive_blocks_reads_straight_into_them(agents):
    _pull(agents, CONSECUTIVE, "direct")
    _all_free(agents[0])


def test_full_source_arena_falls_back_to_block_by_block_and_counts_it(agents):
    src_agent = agents[0]
    hog = src_agent.arena.alloc(src_agent.arena.capacity - ALIGN)  # other reads hold nearly all of it
    try:
        fallbacks, _ = _pull(agents, SCATTERED, "unstaged", src_full=True)
        assert fallbacks == 1
    finally:
        src_agent.arena.free(hog)
    _all_free(src_agent)


def test_full_destination_arena_reads_the_packed_region_block_by_block(agents):
    dst_agent = agents[1]
    hog = dst_agent.arena.alloc(dst_agent.arena.capacity - ALIGN)
    try:
        _, tr = _pull(agents, SCATTERED, "fallback")
        assert tr.metrics.registry.get_sample_value("pdmesh:kv_nixl_staging_fallbacks_total",
                                                    {**tr.metrics.base, "side": "destination"}) == 1
    finally:
        dst_agent.arena.free(hog)
    _all_free(dst_agent)
    _all_free(agents[0])


def test_a_piece_of_a_staged_pull_reads_its_own_blocks(agents):
    """A slowed pull lands in pieces: piece [2, 5) of the packed region, per layer."""
    src_agent, dst_agent = agents
    dst_agent.pool.kv.zero_()
    tr = _transport(dst_agent)

    async def main():
        async with Source(src_agent) as s:
            prepared = await tr.prepare(s.hold("r", SRC), SRC, 10.0)
            assert _run(tr.launch(prepared.state, SRC[2:5], SCATTERED[2:5], dst_agent.pool, first=2)) is TransferState.DONE
            assert _run(tr.launch(prepared.state, SRC[5:], [13, 14], dst_agent.pool, first=5)) is TransferState.DONE
            await s.end_read("r", prepared.read_id)
            await tr.close()

    asyncio.run(main())
    assert torch.equal(dst_agent.pool.kv[:, SCATTERED[2:5]], src_agent.pool.kv[:, SRC[2:5]])
    assert torch.equal(dst_agent.pool.kv[:, [13, 14]], src_agent.pool.kv[:, SRC[5:]])
    assert tr.reads_total == {"unstaged": 0, "staged": 1, "direct": 1, "fallback": 0}
    _all_free(src_agent)
    _all_free(dst_agent)


def test_a_cancelled_staged_read_gives_its_extent_back_once_stopped(agents):
    src_agent, dst_agent = agents
    tr = _transport(dst_agent)

    async def main():
        async with Source(src_agent) as s:
            prepared = await tr.prepare(s.hold("r", SRC), SRC, 10.0)
            xfer = tr.start(prepared, SCATTERED, dst_agent.pool)
            assert dst_agent.arena.used_bytes == _taken(dst_agent, len(SRC))
            t0 = time.monotonic()
            while not xfer.cancel():  # the connector's quarantine: until NIXL says it stopped
                assert time.monotonic() - t0 < 10
                time.sleep(0.001)
            _all_free(dst_agent)
            assert xfer.poll() is not TransferState.RUNNING
            await s.end_read("r", prepared.read_id)
            await tr.close()

    asyncio.run(main())
    _all_free(src_agent)


def _staged_lease(src_agent, ttl: float, max_ttl: float, pin_seconds: float, end) -> None:
    """Hold a lease, stage a read of it (one extent taken), then ``end(source, read_id, t0)``; the
    extent must be taken until the lease ends and back (exact free runs) after."""
    size = src_agent.staged_bytes(len(SRC))

    async def main():
        async with Source(src_agent, ttl, max_ttl) as s:
            desc = s.hold("r", SRC)
            t0 = time.monotonic()
            pin = await begin_read(s.channels, desc, SRC, pin_seconds, stage=True)
            assert pin.staged is not None and pin.staged.num_blocks == len(SRC) and pin.staged.nbytes == size
            assert pin.staged.address == src_agent.arena.address
            taken = _taken(src_agent, len(SRC))
            assert src_agent.arena.free_extents() == [(taken, src_agent.arena.capacity - taken)]
            await end(s, pin.read_id, t0)
            assert s.freed == ["r"] and s.leases.get("r") is None
            _all_free(src_agent)

    asyncio.run(main())


def test_extent_freed_on_end_read(agents):
    async def end(s: Source, read_id: int, t0: float) -> None:
        await s.end_read("r", read_id)

    _staged_lease(agents[0], 30, 120, 10, end)


def test_extent_kept_through_a_release_or_abort_during_the_read_then_freed(agents):
    """A release (decode gave up) or an Abort (client gone: the prefill servicer's Abort releases
    the lease) during the read is deferred; the extent goes when the read ends."""

    async def end(s: Source, read_id: int, t0: float) -> None:
        assert s.leases.release("r")
        assert s.leases.get("r") is not None and s.agent.arena.used_bytes > 0 and not s.freed
        s.leases.reap()
        assert s.agent.arena.used_bytes > 0, "freed while a READ may still read it"
        await s.end_read("r", read_id)

    _staged_lease(agents[0], 30, 120, 10, end)


def test_extent_freed_on_expiry_after_the_pin_ran_out(agents):
    async def end(s: Source, read_id: int, t0: float) -> None:
        assert s.leases.reap(t0 + 1.5) == 0 and s.agent.arena.used_bytes > 0  # pinned until t0 + 2
        assert s.leases.reap(t0 + 2 + 1 + 5) == 1  # pin out, then the soft deadline (ttl 1) passed

    _staged_lease(agents[0], 1, 120, 2, end)


def test_extent_freed_at_the_hard_limit(agents):
    """A pin asked for longer than the lease's hard limit is cut at it; the lease ends there."""

    async def end(s: Source, read_id: int, t0: float) -> None:
        assert s.leases.reap(t0 + 2.5) == 0 and s.agent.arena.used_bytes > 0
        assert s.leases.reap(t0 + 3 + 5) == 1

    _staged_lease(agents[0], 3, 3, 100, end)


def test_arena_extents_are_exact_and_merge_back():
    a = StagingArena(8 * ALIGN, torch.device("cpu"))
    x, y, z = a.alloc(1), a.alloc(ALIGN + 1), a.alloc(ALIGN)
    assert (x.offset, x.nbytes, y.offset, y.nbytes, z.offset) == (0, ALIGN, ALIGN, 2 * ALIGN, 3 * ALIGN)
    assert a.alloc(5 * ALIGN) is None and a.used_bytes == 4 * ALIGN
    a.free(y)
    assert a.free_extents() == [(ALIGN, 2 * ALIGN), (4 * ALIGN, 4 * ALIGN)]
    with pytest.raises(ValueError, match="not an allocated extent"):
        a.free(y)
    assert a.alloc(2 * ALIGN).offset == ALIGN  # first fit
    a.free(x)
    a.free(z)
    assert a.free_extents() == [(0, ALIGN), (3 * ALIGN, 5 * ALIGN)]
    a.free(type(x)(ALIGN, 2 * ALIGN))
    assert a.free_extents() == [(0, 8 * ALIGN)] and a.used_bytes == 0
    with pytest.raises(ValueError, match="at least"):
        StagingArena(100, torch.device("cpu"))
