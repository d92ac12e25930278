"""Staged NIXL pulls, CPU to CPU (DRAM pools, nixl-cu12 over UCX), through the real pieces: a
source ``KVTransferServicer`` on a gRPC server in this process (``BeginRead`` checks the lease token
and packs the blocks into its staging arena), a decode ``NixlKVTransport`` (prepare on the loop,
start and poll as the engine does), NIXL agents with their pools and arenas registered.

Checked: exact bytes for scattered and consecutive destination blocks and for a piece of a pull;
every arena extent back (exact free runs) after each way a lease ends and after a cancelled read;
a full arena on either side falls back to one region per (layer, block), still exact, and counted.
Between tensor-parallel sizes (2 -> 1, 1 -> 2, 2 -> 2): every source rank packed, one READ per
source rank, heads landed on the ranks that hold them through an arena extent (or a buffer
registered for the pull when the arena is full or off), exact in every head. fp8 pools
(--kv-cache-dtype fp8) byte for byte, between TP sizes too.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from pdmesh.transport.nixl import nixl_available

pytestmark = pytest.mark.skipif(not nixl_available(), reason="needs NIXL (pip install nixl-cu12)")

from pdmesh.kv.pool import KVCachePool  # noqa: E402
from pdmesh.kv.shards import plan_pieces, source_ranks  # noqa: E402
from pdmesh.metrics import ServiceMetrics  # noqa: E402
from pdmesh.models.arch import ModelArch  # noqa: E402
from pdmesh.rpc.channels import ChannelPool  # noqa: E402
from pdmesh.rpc.convert import layout_to_proto  # noqa: E402
from pdmesh.transport.base import TransferState  # noqa: E402
from pdmesh.transport.capability import prompt_hash  # noqa: E402
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


def _agent(name: str, fill: bool, tp: int = 1, arena: int = ARENA, dtype: torch.dtype = torch.float32):
    """An agent over a pool of 16 blocks of 3 layers split over ``tp`` ranks (rank 0 maps the others,
    as in a worker), with an ``arena``-byte staging arena (0: none), of ``dtype`` elements."""
    from pdmesh.transport.nixl import NixlAgent

    ranks = [KVCachePool(ARCH, 16, BLOCK, dtype, torch.device("cpu"), tp_size=tp) for _ in range(tp)]
    pool = ranks[0]
    pool.attach_ranks([r.kv for r in ranks[1:]], [None] * (tp - 1))
    if fill:
        g = torch.Generator().manual_seed(7)
        for kv in pool.ranks:
            kv.copy_(torch.randn(kv.shape, generator=g))
    return NixlAgent(name, pool, name, staging_bytes=arena)


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

    def hold(self, rid: str, blocks: list[int], token: str | None = None) -> pb.KVDescriptor:
        """Hold ``blocks`` under a lease; its descriptor carries the lease token (or ``token``)."""
        n = len(blocks) * BLOCK
        h = prompt_hash(list(range(n)))
        lease = self.leases.add(rid, blocks, n, prompt_hash=h)
        return pb.KVDescriptor(request_id=rid, address=self.address, transport="nixl", block_ids=blocks,
                               num_tokens=n, layout=layout_to_proto(self.agent.pool.layout),
                               incarnation=self.agent.incarnation, lease_token=lease.token if token is None else token,
                               prompt_hash=h)

    async def end_read(self, rid: str, read_id: int) -> None:
        lease = self.leases.get(rid)
        await self.channels.stub(self.address, kgrpc.KVTransferStub).EndRead(
            kpb.EndReadRequest(request_id=rid, read_id=read_id, lease_token=lease.token if lease else ""))

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


def _heads(pool: KVCachePool, ids: list[int]) -> torch.Tensor:
    """Blocks ``ids`` with every KV head once, in global order, whatever the TP size."""
    lay = pool.layout
    return torch.cat([pool.ranks[r][:, ids] for r in source_ranks(lay.num_kv_heads, lay.tp_size)], dim=4)


def _exact(src_agent, dst_agent, src: list[int], dst: list[int]) -> None:
    assert torch.equal(_heads(dst_agent.pool, dst).view(torch.uint8), _heads(src_agent.pool, src).view(torch.uint8))
    untouched = sorted(set(range(dst_agent.pool.kv.shape[1])) - set(dst))
    for kv in dst_agent.pool.ranks:
        assert not kv[:, untouched].any(), "a block outside the destination was written"


def _taken(agent, num_blocks: int) -> int:
    """Arena bytes an extent of ``num_blocks`` packed blocks takes (rounded up to ALIGN)."""
    return -(-agent.staged_bytes(num_blocks) // ALIGN) * ALIGN


def _all_free(agent) -> None:
    if agent.arena is not None:
        assert agent.arena.free_extents() == [(0, agent.arena.capacity)] and agent.arena.used_bytes == 0


def _pull(agents, dst: list[int], kinds: dict[str, int], src_full: bool = False):
    """One whole pull of SRC into ``dst`` with the READs ``kinds``; returns (source fallbacks, transport)."""
    src_agent, dst_agent = agents
    for kv in dst_agent.pool.ranks:
        kv.zero_()
    tr = _transport(dst_agent)
    dst_free = dst_agent.arena.free_extents() if dst_agent.arena is not None else None

    async def main():
        async with Source(src_agent) as s:
            desc = s.hold("r", SRC)
            prepared = await tr.prepare(desc, SRC, 10.0)
            staged = dst_agent.arena is not None and not src_full
            assert (prepared.state.staged is not None) == staged
            if staged:  # the packed extent belongs to the lease now
                assert src_agent.arena.used_bytes == _taken(src_agent, len(SRC))
                assert prepared.state.staged.num_ranks == len(src_agent.pack_ranks)
            st = _run(tr.start(prepared, dst, dst_agent.pool))
            assert st is TransferState.DONE
            if dst_free is not None:  # its extents went back when the landings ran
                assert dst_agent.arena.free_extents() == dst_free
            await s.end_read("r", prepared.read_id)
            assert s.freed == ["r"] and s.leases.get("r") is None
            await tr.close()
            return s.fallbacks()

    fallbacks = asyncio.run(main())
    _exact(src_agent, dst_agent, SRC, dst)
    assert {k: v for k, v in tr.reads_total.items() if v} == kinds
    return fallbacks, tr


def test_staged_pull_of_scattered_blocks_is_exact_and_frees_both_extents(agents):
    fallbacks, _ = _pull(agents, SCATTERED, {"staged": 1})
    assert fallbacks == 0
    _all_free(agents[0])


def test_staged_pull_into_consecutive_blocks_reads_straight_into_them(agents):
    _pull(agents, CONSECUTIVE, {"direct": 1})
    _all_free(agents[0])


def test_full_source_arena_falls_back_to_block_by_block_and_counts_it(agents):
    src_agent = agents[0]
    hog = src_agent.arena.alloc(src_agent.arena.capacity - ALIGN)  # other reads hold nearly all of it
    try:
        fallbacks, _ = _pull(agents, SCATTERED, {"unstaged": 1}, src_full=True)
        assert fallbacks == 1
    finally:
        src_agent.arena.free(hog)
    _all_free(src_agent)


def test_full_destination_arena_reads_the_packed_region_block_by_block(agents):
    dst_agent = agents[1]
    hog = dst_agent.arena.alloc(dst_agent.arena.capacity - ALIGN)
    try:
        _, tr = _pull(agents, SCATTERED, {"fallback": 1})
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
            whole = plan_pieces(ARCH.num_kv_heads, 1, 1)
            piece = tr.launch(prepared.state, [0], whole, SRC[2:5], SCATTERED[2:5], dst_agent.pool, first=2)
            assert _run(piece) is TransferState.DONE
            assert _run(tr.launch(prepared.state, [0], whole, SRC[5:], [13, 14], dst_agent.pool, first=5)) is TransferState.DONE
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


def test_a_reader_without_the_lease_token_gets_no_pin_and_nothing_packed(agents):
    """The capability check comes first: a BeginRead with a wrong token is refused and packs nothing."""
    import grpc

    src_agent = agents[0]

    async def main():
        async with Source(src_agent) as s:
            desc = s.hold("r", SRC, token="not-the-token")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.channels.stub(s.address, kgrpc.KVTransferStub).BeginRead(kpb.BeginReadRequest(
                    request_id="r", block_ids=SRC, max_seconds=5, stage=True, lease_token=desc.lease_token,
                    num_tokens=desc.num_tokens, prompt_hash=desc.prompt_hash))
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
            _all_free(src_agent)
            assert s.leases.release("r") and s.freed == ["r"]

    asyncio.run(main())


@pytest.fixture(scope="module")
def tp_agents():
    """Agents over pools of TP 1 and TP 2 (2 KV heads: one per rank at TP 2), sources filled; a TP-2
    destination without an arena too."""
    return {"src1": _agent("tp-src1", True), "src2": _agent("tp-src2", True, tp=2), "dst1": _agent("tp-dst1", False),
            "dst2": _agent("tp-dst2", False, tp=2), "dst2-off": _agent("tp-dst2-off", False, tp=2, arena=0)}


@pytest.mark.parametrize("src,dst,ids,kinds", [
    ("src2", "dst1", SCATTERED, {"staged": 2}),  # each source rank packed, READ once, landed in its head of rank 0
    ("src2", "dst1", CONSECUTIVE, {"staged": 2}),  # mixed sizes land through a buffer even into consecutive blocks
    ("src1", "dst2", SCATTERED, {"staged": 1}),  # one source rank's heads landed on both ranks
    ("src2", "dst2", SCATTERED, {"staged": 2}),  # equal sizes: rank to rank, scattered through an extent
    ("src2", "dst2", CONSECUTIVE, {"direct": 2}),  # equal sizes, consecutive: straight into each rank's pool
    ("src1", "dst2-off", SCATTERED, {"unstaged": 1}),  # no arena here: nothing staged, a buffer registered for the pull
])
def test_staged_pulls_between_tensor_parallel_sizes_are_exact(tp_agents, src, dst, ids, kinds):
    fallbacks, _ = _pull((tp_agents[src], tp_agents[dst]), ids, kinds)
    assert fallbacks == 0
    _all_free(tp_agents[src])


def test_mixed_tp_with_a_full_destination_arena_lands_through_a_registered_buffer(tp_agents):
    dst_agent = tp_agents["dst1"]
    hog = dst_agent.arena.alloc(dst_agent.arena.capacity - ALIGN)
    try:
        _, tr = _pull((tp_agents["src2"], dst_agent), SCATTERED, {"fallback": 2})
        assert tr.metrics.registry.get_sample_value("pdmesh:kv_nixl_staging_fallbacks_total",
                                                    {**tr.metrics.base, "side": "destination"}) == 2
    finally:
        dst_agent.arena.free(hog)
    _all_free(dst_agent)
    _all_free(tp_agents["src2"])


def test_mixed_tp_from_a_full_source_arena_reads_the_pools_into_an_extent_here(tp_agents):
    src_agent = tp_agents["src2"]
    hog = src_agent.arena.alloc(src_agent.arena.capacity - ALIGN)
    try:
        fallbacks, _ = _pull((src_agent, tp_agents["dst1"]), SCATTERED, {"unstaged": 2}, src_full=True)
        assert fallbacks == 1
    finally:
        src_agent.arena.free(hog)
    _all_free(src_agent)
    _all_free(tp_agents["dst1"])


@pytest.mark.parametrize("src_tp,dst_tp,kinds", [(1, 1, {"staged": 1}), (2, 1, {"staged": 2}), (1, 2, {"staged": 1})])
def test_fp8_kv_pulls_are_exact_bytes(src_tp, dst_tp, kinds):
    """--kv-cache-dtype fp8 pools (a byte per element): packed, read and landed byte for byte, between
    TP sizes too (heads gathered and scattered as bytes)."""
    fp8 = torch.float8_e4m3fn
    src = _agent(f"fp8-src-{src_tp}-{dst_tp}", True, tp=src_tp, dtype=fp8)
    dst = _agent(f"fp8-dst-{src_tp}-{dst_tp}", False, tp=dst_tp, dtype=fp8)
    assert src.pool.layout.block_bytes * 4 == KVCachePool(ARCH, 2, BLOCK, torch.float32, torch.device("cpu"), tp_size=src_tp).layout.block_bytes
    fallbacks, _ = _pull((src, dst), SCATTERED, kinds)
    assert fallbacks == 0
    _all_free(src)
    _all_free(dst)


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


def test_a_pull_failing_after_a_read_was_posted_is_failed_and_gives_its_buffers_back(tp_agents):
    """Rank 0's READ posts, rank 1's cannot be prepared (its region lies past the source's arena):
    the pull is a FAILED transfer (not an exception: a READ may be writing), and its landing
    buffers go back once it has stopped."""
    from pdmesh.transport.nixl import NixlSource

    src_agent, dst_agent = tp_agents["src2"], tp_agents["dst1"]
    tr = _transport(dst_agent)

    async def main():
        async with Source(src_agent) as s:
            prepared = await tr.prepare(s.hold("r", SRC), SRC, 10.0)
            real = prepared.state.staged
            per_rank = real.nbytes // 2
            end = src_agent.arena.address + src_agent.arena.capacity
            bad = kpb.NixlStagedRegion(address=end - per_rank, num_blocks=real.num_blocks, nbytes=real.nbytes, num_ranks=2)
            pieces = plan_pieces(ARCH.num_kv_heads, 2, 1)
            xfer = tr.launch(NixlSource(prepared.state.peer, bad), [0, 1], pieces, SRC, SCATTERED, dst_agent.pool)
            assert tr.reads_total["staged"] == 2 and dst_agent.arena.used_bytes > 0
            assert _run(xfer) is TransferState.FAILED and "could not" in xfer.error
            t0 = time.monotonic()
            while not xfer.cancel():
                assert time.monotonic() - t0 < 10
                time.sleep(0.001)
            _all_free(dst_agent)
            await s.end_read("r", prepared.read_id)
            await tr.close()

    asyncio.run(main())
    _all_free(src_agent)
