"""Scheduler service.

Lifecycle
---------
Workers ``Register`` (refused if incompatible) and hold a heartbeat stream that renews their
lease and reports load; a reaper drops workers whose lease ran out (a killed worker leaves
routing within ``lease`` seconds).  Gateways call ``Route`` per request.  The scheduler keeps no
durable state: after a restart, workers re-register by themselves within a heartbeat or two.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Optional

import grpc

from pdmesh.config import _require, add_flags, check_choices
from pdmesh.metrics import ServiceMetrics, watch_event_loop
from pdmesh.rpc.auth import InternalAuthConfig, Identity, build_authenticator
from pdmesh.rpc.authz import caller
from pdmesh.rpc.tls import PLAINTEXT, TlsConfig
from pdmesh.rpc import tracecontext
from pdmesh.telemetry import Telemetry, TracingConfig
from pdmesh.routing import (POLICIES, KVAwarePolicy, NoRoute, NotOwner, PolicyName, Registry, RegistrationRefused,
                            RegistryFull, route)
from pdmesh.rpc.server import Health, bind, make_server, serve_until_signal
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerServiceConfig:
    """The scheduler process."""

    host: str = "0.0.0.0"
    """Address to bind."""
    port: int = 50051
    """gRPC port."""
    metrics_port: int = 8083
    """Port of the scheduler's Prometheus /metrics (-1: off)."""
    heartbeat_interval: float = 1.0
    """Seconds between worker heartbeats (sent to workers at registration)."""
    lease: float = 3.0
    """Seconds without a heartbeat after which a worker leaves routing."""
    routing: PolicyName = "least-loaded"
    """How a request's workers are chosen: 'least-loaded' (fewest queued and running requests),
    'kv-aware' (the prefill or colocated worker with the best mix of cached prompt prefix, weighted
    by KV tier, and load; workers publish their prefix hashes in heartbeats) or 'round-robin'."""
    kv_aware_load_weight: float = 0.1
    """kv-aware: how much one more request queued on a worker weighs against the share of the prompt
    it has cached (0.1: a worker holding the whole prompt wins until it is 10 requests busier)."""
    drain_timeout: float = 5.0
    """Seconds to keep answering after SIGTERM."""
    colocate_below_tokens: int = 1024
    """Conditional disaggregation, in a mesh with both colocated ('pdmesh both') workers and
    prefill/decode pairs: prompts shorter than this go to a colocated worker (a short prefill does
    not pay for a transfer), longer ones are disaggregated.  With one kind of worker, it serves all."""
    max_workers: int = 1024
    """Workers registered at once; beyond it registrations are refused (RESOURCE_EXHAUSTED)."""

    def __post_init__(self) -> None:
        check_choices(self)
        _require(self.max_workers >= 1, "max_workers", "must be >= 1")
        _require(self.colocate_below_tokens >= 0, "colocate_below_tokens", "must be >= 0")
        _require(self.kv_aware_load_weight >= 0, "kv_aware_load_weight", "must be >= 0")
        _require(self.lease > self.heartbeat_interval > 0, "lease", "must exceed --heartbeat-interval > 0")


class SchedulerServicer(sgrpc.SchedulerServicer):
    def __init__(self, cfg: SchedulerServiceConfig, tcfg: Optional[TracingConfig] = None) -> None:
        self.cfg = cfg
        self.tel = Telemetry(tcfg or TracingConfig(tracing="off"), "scheduler")
        self.registry = Registry(cfg.lease, cfg.max_workers)
        self.policy = KVAwarePolicy(cfg.kv_aware_load_weight) if cfg.routing == "kv-aware" else POLICIES[cfg.routing]()
        self.metrics = ServiceMetrics("*", "scheduler", f"{cfg.host}:{cfg.port}")

    async def Register(self, request, context):
        who = caller()
        role = _ROLE_OF.get(request.worker.role)
        if role is not None and who.role != role and who.role != "insecure":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{who} may not register a {role} worker")
        try:
            entry = self.registry.register(request.worker, str(who))
        except RegistrationRefused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except NotOwner as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except RegistryFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        log.info("registered %s (%s) at %s", entry.worker_id, pb.Role.Name(entry.info.role), entry.info.address)
        return spb.RegisterResponse(worker_id=entry.worker_id, heartbeat_interval_ms=int(self.cfg.heartbeat_interval * 1000),
                                    lease_ms=int(self.cfg.lease * 1000))

    async def Heartbeat(self, request_iterator, context):
        owner = str(caller())
        async for beat in request_iterator:
            try:
                known = self.registry.heartbeat(beat.worker_id, beat.load, beat.draining, owner=owner)
            except NotOwner as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            resync = self.registry.apply_kv_events(beat.worker_id, beat.kv_events_seq, beat.kv_events_reset, beat.kv_events)
            if resync:
                log.warning("missed prefix-cache events of %s; asked it for everything again", beat.worker_id)
            yield spb.HeartbeatResponse(known=known, kv_resync=resync)
            if not known:
                return

    async def Deregister(self, request, context):
        try:
            self.registry.remove(request.worker_id, str(caller()))
        except NotOwner as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        log.info("deregistered %s", request.worker_id)
        return spb.DeregisterResponse()

    async def Route(self, request, context):
        span = self.tel.start("pdmesh.route", tracecontext.from_context(context),
                              attributes={"pdmesh.request_id": request.request_id, "gen_ai.request.model": request.model,
                                          "gen_ai.usage.input_tokens": request.prompt_tokens})
        try:
            try:
                p, d, t, reason = route(self.registry, self.policy, request.model, request.prompt_tokens,
                                        list(request.exclude_worker_ids), self.cfg.colocate_below_tokens,
                                        request.prompt_token_ids)
            except NoRoute as exc:
                self.metrics.inc("request_failure_total", reason="no_route")
                span.set_attribute("error.type", "no_route")
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            span.set_attributes({"pdmesh.route.prefill_worker": p.worker_id, "pdmesh.route.decode_worker": d.worker_id,
                                 "pdmesh.route.transport": t, "pdmesh.route.reason": reason})
            return spb.RouteResponse(prefill=p.info, decode=d.info, transport=t, reason=reason, colocated=p is d)
        finally:
            span.end()

    async def ListWorkers(self, request, context):
        now = time.monotonic()
        return spb.ListWorkersResponse(workers=[
            spb.WorkerStatus(info=e.info, load=e.load, last_heartbeat_age_s=now - e.last_seen, draining=e.draining,
                             kv_hashes={t: len(h) for t, h in e.kv.items()})
            for e in self.registry.workers.values()
        ])

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval / 2)
            for w in self.registry.expire():
                log.warning("worker %s missed its heartbeats: removed from routing", w)


async def serve(cfg: SchedulerServiceConfig, tcfg: Optional[TracingConfig] = None, tls: TlsConfig = PLAINTEXT,
                acfg: Optional[InternalAuthConfig] = None) -> None:
    auth = build_authenticator(acfg or InternalAuthConfig(), tls, "scheduler", lambda: Identity("scheduler", "scheduler"))
    servicer = SchedulerServicer(cfg, tcfg)
    server = make_server(auth, servicer.metrics.refused_call)
    sgrpc.add_SchedulerServicer_to_server(servicer, server)
    health = Health(server, ["pdmesh.v1.Scheduler"])
    port = bind(server, cfg.host, cfg.port, tls)
    await server.start()
    await health.set_serving(True)
    if cfg.metrics_port >= 0:
        servicer.metrics.serve(cfg.metrics_port, cfg.host)
    background = [asyncio.create_task(servicer.reap_forever()), asyncio.create_task(watch_event_loop(servicer.metrics))]
    metrics = f" metrics={servicer.metrics.port}" if cfg.metrics_port >= 0 else ""
    print(f"READY scheduler {cfg.host}:{port}{metrics}", flush=True)
    log.info("scheduler serving on %s:%d", cfg.host, port)
    await serve_until_signal(server, health, cfg.drain_timeout)
    for t in background:
        t.cancel()
    servicer.tel.shutdown()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdmesh scheduler", description="pdmesh scheduler: registry and routing")
    add_flags(p, SchedulerServiceConfig)
    add_flags(p, TracingConfig)
    add_flags(p, TlsConfig)
    add_flags(p, InternalAuthConfig)
    return p


_ROLE_OF = {pb.ROLE_PREFILL: "prefill", pb.ROLE_DECODE: "decode", pb.ROLE_BOTH: "both"}
