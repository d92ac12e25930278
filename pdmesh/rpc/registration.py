"""A worker's membership in the mesh: register with the scheduler, keep the lease alive with a
heartbeat stream that carries load, and re-register on its own when the scheduler restarts or
forgets the worker.  Runs as one asyncio task; never raises out of ``run``.

A worker that computes prompts also publishes the prefix hashes it holds per KV tier
(``KVEventLog``): each heartbeat stream starts with everything held (``kv_events_reset``, over
several messages when large), then every heartbeat carries the net changes since the one before,
numbered; when the scheduler answers ``kv_resync`` (it missed some), the next heartbeat starts over
with everything."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

import grpc

from pdmesh.kv.events import KVEventLog
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc
from pdmesh.rpc.auth import BaseAuthenticator
from pdmesh.rpc.channels import open_channel
from pdmesh.rpc.tls import PLAINTEXT, TlsConfig

log = logging.getLogger(__name__)
_REFUSALS = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
             grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


class Registration:
    def __init__(self, scheduler_address: str, info: pb.WorkerInfo, load: Callable[[], pb.WorkerLoad],
                 rpc_timeout: float = 5.0, tls: TlsConfig = PLAINTEXT, auth: Optional[BaseAuthenticator] = None,
                 kv_events: Optional[KVEventLog] = None) -> None:
        self.tls = tls
        self.auth = auth
        """This worker's credentials on its calls to the scheduler."""
        self.kv_events = kv_events
        self._resync = False
        self.scheduler_address = scheduler_address
        self.info = info
        self.load = load
        self.rpc_timeout = rpc_timeout
        self.stream_deadline = 300.0
        """Seconds one heartbeat stream lives before it is renewed."""
        self.registered = asyncio.Event()
        self.draining = False
        self._stop = asyncio.Event()

    async def run(self) -> None:
        backoff = 0.2
        async with open_channel(self.scheduler_address, self.tls, self.auth) as ch:
            stub = sgrpc.SchedulerStub(ch)
            while not self._stop.is_set():
                try:
                    resp = await stub.Register(spb.RegisterRequest(worker=self.info), timeout=self.rpc_timeout)
                    self.registered.set()
                    backoff = 0.2
                    log.info("registered with scheduler %s as %s", self.scheduler_address, resp.worker_id)
                    await self._heartbeat(stub, resp.heartbeat_interval_ms / 1000.0)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.registered.is_set():
                        continue  # the stream's deadline: renew at once
                    self.registered.clear()
                    if exc.code() in _REFUSALS:
                        log.error("scheduler refused registration (%s): %s", exc.code().name, exc.details())
                    else:
                        log.info("scheduler unreachable (%s); retrying", exc.code().name)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - keep trying
                    log.exception("registration loop error")
                    self.registered.clear()
                if not self._stop.is_set():
                    try:
                        await asyncio.wait_for(self._stop.wait(), backoff)
                    except asyncio.TimeoutError:
                        pass
                    backoff = min(backoff * 2, 2.0)
            if self.registered.is_set():
                try:
                    await stub.Deregister(spb.DeregisterRequest(worker_id=self.info.worker_id), timeout=2.0)
                except grpc.aio.AioRpcError:
                    pass

    async def _heartbeat(self, stub: sgrpc.SchedulerStub, interval: float) -> None:
        seq = 0
        self._resync = True  # a new stream starts with everything held

        async def beats():
            nonlocal seq
            while not self._stop.is_set():
                beat = spb.HeartbeatRequest(worker_id=self.info.worker_id, load=self.load(), draining=self.draining)
                if self.kv_events is None:
                    yield beat
                elif self._resync:
                    self._resync = False
                    for i, events in enumerate(self.kv_events.snapshot()):
                        seq += 1
                        msg = spb.HeartbeatRequest()
                        msg.CopyFrom(beat)
                        msg.kv_events_seq, msg.kv_events_reset = seq, i == 0
                        msg.kv_events.extend(events)
                        yield msg
                else:
                    seq += 1
                    beat.kv_events_seq = seq
                    beat.kv_events.extend(self.kv_events.drain())
                    yield beat
                try:
                    await asyncio.wait_for(self._stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass

        # Like every call here, the stream has a deadline; when it passes, the worker re-registers
        # (idempotent) and opens a new stream.
        call = stub.Heartbeat(beats(), timeout=self.stream_deadline)
        async for resp in call:
            if resp.kv_resync:
                log.info("scheduler missed prefix-cache events; sending everything held again")
                self._resync = True
            if not resp.known:
                log.info("scheduler does not know this worker; re-registering")
                call.cancel()
                return

    async def stop(self) -> None:
        self._stop.set()
