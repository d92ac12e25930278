"""Which prefill workers a decode worker may dial: those the scheduler lists, nothing else.

A KV descriptor names the prefill worker that holds the KV (id and address).  The decode worker
dials that address only when the scheduler's registry lists a prefill worker with that id at that
address (the registry is authenticated: only a worker's own identity can register it), so a forged
descriptor cannot make it connect anywhere, nor grow its channel cache without bound.  The list is
refreshed every ``refresh_s`` and when a descriptor names a worker not known yet (a worker that
just registered): that descriptor waits for a list fetched after it arrived (fetches at most every
``min_refetch_s``), so a new worker's first request is never refused for a stale list.

A worker that leaves the list (it drains, or dies and its lease runs out) stays admitted at its
address for ``remember_s`` (the longest a lease on its KV can live): a request whose KV it computed
just before it left still has its pull tried — and recomputed when the pull fails — instead of being
refused like a forged descriptor.
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
                 rpc_timeout: float = 2.0, remember_s: float = 120.0) -> None:
        self.scheduler = scheduler
        self.channels = channels
        self.refresh_s = refresh_s
        self.min_refetch_s = min_refetch_s
        self.rpc_timeout = rpc_timeout
        self.known: dict[str, str] = {}
        """Prefill worker id -> address, as last listed."""
        self.remember_s = remember_s
        self.departed: dict[str, tuple[str, float]] = {}
        """Prefill worker id -> (address, when it left the list), for ``remember_s``."""
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
        now = time.monotonic()
        known = {w.info.worker_id: w.info.address for w in resp.workers if w.info.role == pb.ROLE_PREFILL}
        for wid, addr in self.known.items():
            if wid not in known:
                self.departed[wid] = (addr, now)
        self.departed = {wid: (addr, t) for wid, (addr, t) in self.departed.items()
                         if wid not in known and now - t < self.remember_s}
        self.known = known

    async def refresh(self) -> None:
        """Fetch the list (one fetch at a time: concurrent callers share it)."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.ensure_future(self._fetch())
        await asyncio.shield(self._fetching)

    def _listed(self, worker_id: str, address: str) -> bool:
        if self.known.get(worker_id) == address:
            return True
        gone = self.departed.get(worker_id)
        return gone is not None and gone[0] == address and time.monotonic() - gone[1] < self.remember_s

    async def admits(self, worker_id: str, address: str) -> bool:
        """Whether the scheduler lists prefill worker ``worker_id`` at ``address`` (or did, less
        than ``remember_s`` ago), by a list fetched after this question was asked if it is not known."""
        if self._listed(worker_id, address):
            return True
        asked = time.monotonic()
        while self._fetched_at < asked:  # wait for a list fetched after the question (shared, rate-limited)
            wait = self._fetched_at + self.min_refetch_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.refresh()
        return self._listed(worker_id, address)

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)
