"""Which prefill workers a decode worker may dial (``pdmesh.rpc.peers``), against a scheduler
stand-in served over real gRPC whose list the test changes."""

from __future__ import annotations

import asyncio

import grpc

from pdmesh.rpc.channels import ChannelPool
from pdmesh.rpc.peers import PeerDirectory
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc


class _Listing(sgrpc.SchedulerServicer):
    def __init__(self) -> None:
        self.prefill: dict[str, str] = {}
        self.calls = 0

    async def ListWorkers(self, request, context):
        self.calls += 1
        return spb.ListWorkersResponse(workers=[
            spb.WorkerStatus(info=pb.WorkerInfo(worker_id=w, address=a, role=pb.ROLE_PREFILL)) for w, a in self.prefill.items()])


async def _with_scheduler(body) -> None:
    listing = _Listing()
    server = grpc.aio.server()
    sgrpc.add_SchedulerServicer_to_server(listing, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = ChannelPool()
    try:
        await body(listing, f"127.0.0.1:{port}", channels)
    finally:
        await channels.close()
        await server.stop(None)


def test_a_worker_listed_just_after_the_last_fetch_is_admitted():
    async def body(listing, addr, channels):
        peers = PeerDirectory(addr, channels, refresh_s=60, min_refetch_s=0.3)
        await peers.refresh()  # fetched before the worker registered
        listing.prefill["p1"] = "10.0.0.1:1"
        assert await peers.admits("p1", "10.0.0.1:1")  # waits for a fetch made after the question
        assert not await peers.admits("p2", "10.0.0.2:1")  # never listed
        assert not await peers.admits("p1", "10.0.0.9:1")  # listed, but at another address

    asyncio.run(_with_scheduler(body))


def test_unknown_names_share_rate_limited_fetches():
    async def body(listing, addr, channels):
        peers = PeerDirectory(addr, channels, refresh_s=60, min_refetch_s=0.3)
        await peers.refresh()
        before = listing.calls
        results = await asyncio.gather(*(peers.admits(f"evil-{i}", "10.9.9.9:1") for i in range(50)))
        assert not any(results)
        assert listing.calls - before <= 2, listing.calls - before

    asyncio.run(_with_scheduler(body))


def test_a_departed_worker_stays_admitted_for_remember_s_then_not():
    async def body(listing, addr, channels):
        peers = PeerDirectory(addr, channels, refresh_s=60, min_refetch_s=0.05, remember_s=0.5)
        listing.prefill["p1"] = "10.0.0.1:1"
        await peers.refresh()
        del listing.prefill["p1"]
        await peers.refresh()  # it left the list
        assert "p1" not in peers.known
        assert await peers.admits("p1", "10.0.0.1:1")  # a request whose KV it computed before leaving
        assert not await peers.admits("p1", "10.0.0.2:1")
        await asyncio.sleep(0.6)
        assert not await peers.admits("p1", "10.0.0.1:1")

    asyncio.run(_with_scheduler(body))
