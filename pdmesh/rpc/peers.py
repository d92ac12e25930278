"""Which prefill workers a decode worker may dial: those the scheduler lists, nothing else.

A KV descriptor names the prefill worker that holds the KV (id and address).  The decode worker
dials that address only when the scheduler's registry lists a prefill worker with that id at that
address (the registry is authenticated: only a worker's own identity can register it), so a forged
descriptor cannot make it connect anywhere, nor grow its channel cache without bound.  The list is
refreshed every ``refresh_s`` and, at most every ``min_refetch_s``, when a descriptor names a
worker not known yet (a worker that just registered).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdmesh.rpc.channels import ChannelPool
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc

log = logging.getLogger(__name__)


class PeerDirectory:
    def __init__(self, scheduler: str, channels: ChannelPool, refresh_s: float = 1.0, min_refetch_s: float = 0.25,
                 rpc_timeout: float = 2.0) -> None:
        self.scheduler = scheduler
        self.channels = channels
        self.refresh_s = refresh_s
        self.min_refetch_s = min_refetch_s
        self.rpc_timeout = rpc_timeout
        self.known: dict[str, str] = {}
        """Prefill worker id -> address, as last listed."""
        self._fetched_at = float("-inf")
        self._fetching: "asyncio.Future[None] | None" = None

    async def _fetch(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            resp = await self.channels.stub(self.scheduler, sgrpc.SchedulerStub).ListWorkers(
                spb.ListWorkersRequest(), timeout=self.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            log.info("cannot list workers (%s): keeping the %d known prefill workers", exc.code().name, len(self.known))
            return
        self.known = {w.info.worker_id: w.info.address for w in resp.workers if w.info.role == pb.ROLE_PREFILL}

    async def refresh(self) -> None:
        """Fetch the list (one fetch at a time: concurrent callers share it)."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.ensure_future(self._fetch())
        await asyncio.shield(self._fetching)

    async def admits(self, worker_id: str, address: str) -> bool:
        """Whether the scheduler lists prefill worker ``worker_id`` at ``address``."""
        if self.known.get(worker_id) == address:
            return True
        if time.monotonic() - self._fetched_at >= self.min_refetch_s:
            await self.refresh()
        return self.known.get(worker_id) == address

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)
