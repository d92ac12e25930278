"""What every worker process shares: its config, the engine thread, the gRPC server with health
checking, membership in the mesh, load reports and graceful drain.

Lifecycle of a worker process
-----------------------------
1. Parse flags into ``WorkerConfig`` + ``EngineConfig``; start the engine thread (loads weights).
2. Bind the gRPC server (port 0 picks a free one), add the role's servicers and health.
3. Register with the scheduler and heartbeat load; re-register by itself if the scheduler restarts.
4. On SIGTERM/SIGINT: health NOT_SERVING, heartbeats say ``draining`` (no new routes), refuse new
   requests, wait up to ``--drain-timeout`` for in-flight ones, deregister, stop, exit 0.
5. If the engine stops (its thread failed) or, with ``--tensor-parallel-size``, a rank process dies:
   in-flight requests end with an error, the worker deregisters, stops at once and exits with
   status 1 (the other ranks are killed): the mesh sees a dead worker (routing drops it; prefill
   leases of KV it was pulling expire), never a half-alive one.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shlex
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Literal, Optional

import grpc

from pdmesh.config import EngineConfig, _require, add_flags, check_choices, from_flags
from pdmesh.engine.async_engine import AsyncEngine
from pdmesh.engine.engine import LLMEngine, pick_device
from pdmesh.engine.spec_decode import SpecStats
from pdmesh.engine.warmup import warm_up
from pdmesh.env import ENV
from pdmesh.kv.events import KVEventLog
from pdmesh.metrics import ServiceMetrics, watch_event_loop
from pdmesh.telemetry import Telemetry, TracingConfig
from pdmesh.routing import LOCAL, KVTransportName
from pdmesh.rpc.convert import layout_to_proto
from pdmesh.rpc.channels import ChannelPool
from pdmesh.rpc.auth import Identity, InternalAuthConfig, build_authenticator
from pdmesh.rpc.ownership import RequestOwners
from pdmesh.rpc.registration import Registration
from pdmesh.rpc.tls import PLAINTEXT, TlsConfig
from pdmesh.transport.faults import FaultPlan
from pdmesh.rpc.server import Health, bind, make_server, serve_until_signal
from pdmesh.v1 import common_pb2 as pb

log = logging.getLogger(__name__)

ROLES = {"prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE, "both": pb.ROLE_BOTH}
"""Worker roles by command name ('both': one engine prefills and decodes, colocated)."""
ROLE_NAMES = {v: k for k, v in ROLES.items()}
_METRICS_PORTS = {"prefill": 8081, "decode": 8082, "both": 8084}


@dataclass(frozen=True)
class WorkerConfig:
    """A prefill, decode or colocated ('both') worker's place in the mesh."""

    host: str = "0.0.0.0"
    """Address the gRPC server binds."""
    port: int = 0
    """gRPC port (0 picks a free port; the bound port is what gets registered)."""
    advertise_host: str = "127.0.0.1"
    """Host peers use to reach this worker (a pod IP or DNS name across hosts); 'auto': the IP
    address of this machine's hostname (a container's or pod's own IP)."""
    scheduler: str = "127.0.0.1:50051"
    """host:port of the scheduler."""
    worker_id: Optional[str] = None
    """Unique id in the mesh (default: role-host-port)."""
    drain_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM."""
    kv_lease_seconds: float = 30.0
    """Prefill: how long KV is held for a decode worker that has not pulled it yet (a pull extends it)."""
    kv_lease_max_seconds: float = 120.0
    """Prefill: hard limit of a KV lease from when the KV was held: no pull or read pin outlives
    it, pinned or not (>= --kv-lease-seconds)."""
    kv_transfer_timeout: float = 30.0
    """Decode: deadline of one KV pull."""
    rpc_timeout: float = 10.0
    """Deadline of short control RPCs (release, abort, register)."""
    metrics_port: int = -1
    """Port of this worker's /metrics (0: any free port, registered with the scheduler; -1: off)."""
    kv_transports: tuple[KVTransportName, ...] = ()
    """KV transports this worker offers, in order of preference: cuda_ipc (same host), nixl
    (needs NIXL installed), grpc. Empty: cuda_ipc, nixl (when installed), grpc on CUDA; grpc on CPU.
    The scheduler pairs workers over a transport both offer and can use (cuda_ipc only on one host)."""
    nixl_threads: int = 0
    """Worker threads of NIXL's UCX backend that post one transfer's descriptors in parallel
    (0: the backend's single progress thread). A pull is one descriptor per (layer, block)."""
    nixl_staging_mb: int = 512
    """NIXL staging arena in MB, on the KV pool's device, outside the KV pool (0: off): prefill packs the
    blocks a nixl reader asks for into it (one gather) and decode reads them with one READ, then scatters
    them with one kernel, instead of one READ region per (layer, block). Held only while a read is in
    flight (prefill: until the lease ends); a full arena falls back to one region per (layer, block)."""
    max_pending_requests: int = 1024
    """Requests this worker takes at once (queued and running); beyond it new ones are refused with
    RESOURCE_EXHAUSTED, which the gateway answers with 429 (or retries elsewhere)."""
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"
    """Decode: what a failed or timed-out KV pull does to its request: 'recompute' (compute the prompt
    here; the client sees nothing) or 'fail' (end the request with an error)."""
    inject_kv_faults: str = ""
    """For fault testing only. Prefill: corrupt KV pulls served here: 'fail:N' (every Nth pull
    aborts), 'truncate:N' (every Nth pull loses its last chunk), 'delay:S' (S seconds before each
    chunk). Decode: 'delay:S[:N]' (every Nth pull, every pull without N, lands in the pool one piece every
    S seconds)."""

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "port", "must be in 0..65535")
        _require(self.drain_timeout >= 0, "drain_timeout", "must be >= 0")
        _require(self.kv_lease_seconds > 0, "kv_lease_seconds", "must be > 0")
        _require(self.kv_lease_max_seconds >= self.kv_lease_seconds, "kv_lease_max_seconds", "must be >= --kv-lease-seconds")
        _require(self.kv_transfer_timeout > 0, "kv_transfer_timeout", "must be > 0")
        _require(self.max_pending_requests >= 1, "max_pending_requests", "must be >= 1")
        _require(0 <= self.nixl_threads <= 64, "nixl_threads", "must be in 0..64")
        _require(0 <= self.nixl_staging_mb <= 65536, "nixl_staging_mb", "must be in 0..65536 (MB; 0 turns staging off)")
        check_choices(self)
        FaultPlan.parse(self.inject_kv_faults)
        _require(len(set(self.kv_transports)) == len(self.kv_transports), "kv_transports", "lists a transport twice")
        if "nixl" in self.kv_transports:
            from pdmesh.transport.nixl import nixl_available

            _require(nixl_available(), "kv_transports", "nixl needs NIXL: pip install nixl-cu12 (or nixl-cu13 on CUDA 13)")


def worker_parser(role: str, default_port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"pdmesh {role}", description=f"pdmesh {role} worker")
    add_flags(parser, WorkerConfig)
    add_flags(parser, TracingConfig)
    add_flags(parser, TlsConfig)
    add_flags(parser, InternalAuthConfig)
    parser.set_defaults(port=default_port, metrics_port=_METRICS_PORTS[role])
    EngineConfig.add_flags(parser)
    return parser


class WorkerRuntime:
    """Engine + server + registration for one worker; the role adds servicers."""

    def __init__(self, role: pb.Role, wcfg: WorkerConfig, ecfg: EngineConfig, tcfg: Optional[TracingConfig] = None,
                 tls: TlsConfig = PLAINTEXT, acfg: Optional[InternalAuthConfig] = None) -> None:
        self.role = role
        self.tls = tls
        self.auth = build_authenticator(acfg or InternalAuthConfig(), tls, ROLE_NAMES[role], lambda: Identity(ROLE_NAMES[role], self.worker_id))
        """This worker's identity on its calls, and the check of its callers' (its id: the worker id)."""
        self.channels = ChannelPool(tls, self.auth)
        """Channels to peers (prefill workers, for decode), over TLS when configured, with credentials."""
        self.owners = RequestOwners()
        """The identity that started each live request here (only it may abort it)."""
        self.tel = Telemetry(tcfg or TracingConfig(tracing="off"), ROLE_NAMES[role])
        self.wcfg = wcfg
        self.ecfg = ecfg
        self.kv_events = KVEventLog() if role in (pb.ROLE_PREFILL, pb.ROLE_BOTH) else None
        """The prefix hashes this worker holds per tier, published in heartbeats (workers that compute
        prompts: routing by cached prefix sends a prompt where its prefix is)."""
        self.engine = AsyncEngine(lambda: LLMEngine(ecfg, kv_events=self.kv_events), device=pick_device(ecfg.device.device))
        self.server: Optional[grpc.aio.Server] = None
        self.health: Optional[Health] = None
        self.registration: Optional[Registration] = None
        self.inflight = 0
        self.requests_total = 0
        self.metrics: Optional[ServiceMetrics] = None
        self._last_prefix = (0, 0)
        self._last_tiers: dict[str, dict[str, float]] = {}
        self._last_audit = 0
        self._last_spec: Optional[SpecStats] = None
        self.incarnation = uuid.uuid4().hex
        """Identifies this process: peers drop cached CUDA IPC handles and NIXL metadata when it changes."""
        self.draining = False
        self.port = 0
        self._registration_task: Optional[asyncio.Task] = None

    @property
    def worker_id(self) -> str:
        return self.wcfg.worker_id or f"{ROLE_NAMES[self.role]}-{self.advertise_host}-{self.port}"

    @functools.cached_property
    def advertise_host(self) -> str:
        if self.wcfg.advertise_host == "auto":
            return socket.gethostbyname(socket.gethostname())
        return self.wcfg.advertise_host

    @functools.cached_property
    def host_id(self) -> str:
        """Workers with equal host ids can use same-host transports (cuda_ipc)."""
        return ENV.HOSTNAME.get() or socket.gethostname()

    @property
    def address(self) -> str:
        return f"{self.advertise_host}:{self.port}"

    @functools.cached_property
    def transports(self) -> tuple[str, ...]:
        """KV transports offered, in order of preference."""
        if self.role == pb.ROLE_BOTH:
            return (LOCAL,)  # colocated: KV never leaves this worker
        if self.wcfg.kv_transports:
            return self.wcfg.kv_transports
        if self.llm.device.type != "cuda":
            return ("grpc",)
        from pdmesh.transport.nixl import nixl_available

        return ("cuda_ipc", "nixl", "grpc") if nixl_available() else ("cuda_ipc", "grpc")

    @functools.cached_property
    def nixl_agent(self):
        """This worker's NIXL agent (its KV pool registered once), when it offers nixl."""
        if "nixl" not in self.transports:
            return None
        from pdmesh.transport.nixl import NixlAgent

        return NixlAgent(f"pdmesh-{ROLE_NAMES[self.role]}-{self.incarnation}", self.llm.pool, self.incarnation,
                         num_threads=self.wcfg.nixl_threads, staging_bytes=self.wcfg.nixl_staging_mb << 20)

    @property
    def llm(self) -> LLMEngine:
        assert self.engine.engine is not None
        return self.engine.engine

    def load(self) -> pb.WorkerLoad:
        s = self.engine.stats
        if s is None:
            return pb.WorkerLoad(inflight=self.inflight, requests_total=self.requests_total)
        return pb.WorkerLoad(free_blocks=s.free_blocks, total_blocks=s.total_blocks, running=s.num_running,
                             waiting=s.num_waiting, held_blocks=s.held_blocks, waiting_for_kv=s.num_waiting_for_kv,
                             inflight=self.inflight, requests_total=self.requests_total)

    def info(self) -> pb.WorkerInfo:
        eng = self.llm
        return pb.WorkerInfo(
            worker_id=self.worker_id, role=self.role, address=self.address, model=eng.resolved.served_name,
            dtype=str(eng.dtype).removeprefix("torch."), kv_layout=layout_to_proto(eng.pool.layout),
            transports=list(self.transports), host_id=self.host_id,
            max_model_len=eng.max_model_len, total_blocks=eng.blocks.num_blocks,
            metrics_port=self.metrics.port if self.metrics else 0,
            device_index=eng.device.index if eng.device.type == "cuda" and eng.device.index is not None else (0 if eng.device.type == "cuda" else -1),
        )

    async def refuse_if_unable(self, context: grpc.aio.ServicerContext, trailing: tuple = ()) -> None:
        """Refuse a new request while draining (UNAVAILABLE: the gateway retries elsewhere) or when
        ``--max-pending-requests`` are already here (RESOURCE_EXHAUSTED: 429 at the gateway);
        ``trailing``: metadata sent with the refusal."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining", trailing)
        if self.inflight >= self.wcfg.max_pending_requests:
            if self.metrics is not None:
                self.metrics.inc("request_failure_total", reason="overloaded")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"worker {self.worker_id} has {self.inflight} requests pending (limit {self.wcfg.max_pending_requests})",
                                trailing)

    async def run(self, add_servicers: Callable[["WorkerRuntime"], list[str]],
                  background: Callable[["WorkerRuntime"], list[Coroutine[Any, Any, Any]]] = lambda rt: []) -> None:
        await self.engine.start()
        warm = self.ecfg.device.warmup
        if warm == "on" or (warm == "auto" and self.llm.device.type == "cuda"):
            log.info("warming up: compiling the kernels of every step kind before registering")
            await self.engine.call(warm_up)
        self.server = make_server(self.auth, self._refused)  # grpc.aio objects belong to the running loop
        self.port = bind(self.server, self.wcfg.host, self.wcfg.port, self.tls)  # the worker id carries the bound port
        self.metrics = ServiceMetrics(self.llm.resolved.served_name, ROLE_NAMES[self.role], self.worker_id)
        if self.wcfg.metrics_port >= 0:
            self.metrics.serve(self.wcfg.metrics_port, self.wcfg.host)
        self.engine.on_step = self._on_step
        names = add_servicers(self)
        self.health = Health(self.server, names)
        await self.server.start()
        await self.health.set_serving(True)
        self.registration = Registration(self.wcfg.scheduler, self.info(), self.load, self.wcfg.rpc_timeout, self.tls,
                                         self.auth, self.kv_events)
        self._registration_task = asyncio.create_task(self.registration.run())
        tasks = [self._registration_task, asyncio.create_task(self._refresh_gauges()),
                 asyncio.create_task(watch_event_loop(self.metrics))]
        tasks += [asyncio.create_task(c) for c in background(self)]
        fatal: asyncio.Future = asyncio.get_running_loop().create_future()
        tasks.append(asyncio.create_task(self._watch_engine(fatal)))
        log.info("%s serving on %s (pid %d)", self.worker_id, self.address, os.getpid())
        metrics = self.metrics.port if self.wcfg.metrics_port >= 0 else -1
        tp = self.ecfg.device.tensor_parallel_size
        print(f"READY {shlex.quote(self.worker_id)} {self.address} metrics={metrics} device={self.llm.device}"
              + (f" tp={tp} devices={self.ecfg.device.device} all_reduce={self.llm.tp.all_reduce_impl}" if tp > 1 else ""),
              flush=True)
        why = await serve_until_signal(self.server, self.health, self.wcfg.drain_timeout, self._drain, fatal)
        if why is not None:  # the engine or a rank is gone: fail what is in flight, leave the mesh, exit 1
            self.engine.fail(why)
            if self.llm.ranks is not None:
                self.llm.ranks.kill()
        await self.registration.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.engine.shutdown(timeout=5.0 if why is not None else 30.0)
        await self.channels.close()
        self.tel.shutdown()
        if why is not None:
            # Exit now: a process group whose peer died may abort in its destructors at interpreter exit.
            logging.shutdown()
            os._exit(1)

    async def _watch_engine(self, fatal: asyncio.Future, interval: float = 0.2) -> None:
        """When the engine thread has stopped or a rank process died: refuse new requests, leave
        routing (deregister), then resolve ``fatal`` (the server stops)."""
        ranks = self.llm.ranks  # kept: the engine lets go of it when it closes
        while not fatal.done():
            why = ranks.dead() if ranks is not None else None
            if why is None and not self.engine.alive:
                why = f"the engine stopped: {self.engine.error!r}"
                if ranks is not None:
                    for _ in range(10):  # a collective fails as soon as a rank dies
                        await asyncio.sleep(0.1)
                        dead = ranks.dead()
                        if dead:
                            why = f"{dead}; {why}"
                            break
            if why is not None:
                log.error("%s: leaving the mesh", why)
                self.draining = True
                if self.registration is not None and self._registration_task is not None:
                    self.registration.draining = True
                    await self.registration.stop()
                    await asyncio.wait([self._registration_task], timeout=self.wcfg.rpc_timeout)
                fatal.set_result(why)
                return
            await asyncio.sleep(interval)

    def _refused(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.refused_call(method, code)

    def _on_step(self, outputs, dt: float, kind: str) -> None:
        """Per-step metrics (loop thread): step time by kind, tokens, and for requests whose
        prompt was computed here (their first token): prompt tokens, queue and prefill time."""
        m = self.metrics
        if m is None:
            return
        kind = kind or "decode"
        tokens = sum(len(o.new_token_ids) for o in outputs)
        m.observe("engine_step_seconds", dt, kind=kind)
        m.inc("engine_step_tokens_total", tokens, kind=kind)
        m.inc("engine_step_token_seconds_total", dt * tokens, kind=kind)
        m.inc("generation_tokens_total", tokens)
        for o in outputs:
            if o.prefill_time is not None:
                m.inc("prompt_tokens_total", o.num_prompt_tokens)
                m.observe("request_queue_time_seconds", o.queue_time)
                m.observe("request_prefill_time_seconds", o.prefill_time)

    async def _refresh_gauges(self, interval: float = 0.5) -> None:
        while True:
            s, m = self.engine.stats, self.metrics
            if s is not None and m is not None:
                m.set("num_requests_running", s.num_running + s.num_waiting_for_kv)
                m.set("num_requests_waiting", s.num_waiting)
                m.set("kv_blocks_free", s.free_blocks)
                m.set("kv_cache_usage_perc", 1.0 - s.free_blocks / s.total_blocks)
                m.set("kv_blocks_held_for_transfer", s.held_blocks)
                q, h = self._last_prefix
                m.inc("prefix_cache_queries_total", s.prefix_queries - q)
                m.inc("prefix_cache_hits_total", s.prefix_hits - h)
                self._last_prefix = (s.prefix_queries, s.prefix_hits)
                m.inc("kv_audit_mismatches_total", s.audit_mismatches - self._last_audit)
                self._last_audit = s.audit_mismatches
                for tier, c in (s.tiers or {}).items():
                    self._export_tier(m, tier, c)
                if s.spec is not None:
                    self._spec_counters(m, s.spec)
            agent = self.__dict__.get("nixl_agent")  # made when the servicers were added, if nixl is offered
            if m is not None and agent is not None and agent.arena is not None:
                m.set("kv_nixl_staging_used_bytes", agent.arena.used_bytes)
            await asyncio.sleep(interval)

    _TIER_COUNTERS = {"hits": "kv_tier_hits_total", "misses": "kv_tier_misses_total",
                      "offload_bytes": "kv_tier_offload_bytes_total", "offload_seconds": "kv_tier_offload_seconds_total",
                      "load_bytes": "kv_tier_load_bytes_total", "load_seconds": "kv_tier_load_seconds_total",
                      "dropped_blocks": "kv_tier_dropped_blocks_total", "corrupt_blocks": "kv_tier_corrupt_blocks_total"}

    def _export_tier(self, m: ServiceMetrics, tier: str, c) -> None:
        """One lower KV tier's counters (as increments since the last refresh) and occupancy."""
        last = self._last_tiers.setdefault(tier, {})
        for field, name in self._TIER_COUNTERS.items():
            v = getattr(c, field)
            m.inc(name, v - last.get(field, 0), tier=tier)
            last[field] = v
        m.set("kv_tier_usage_bytes", c.used_bytes, tier=tier)
        m.set("kv_tier_capacity_bytes", c.capacity_bytes, tier=tier)

    def _spec_counters(self, m: ServiceMetrics, now: "SpecStats") -> None:
        """Advance the spec_decode counters by what the engine counted since the last refresh."""
        last = self._last_spec or SpecStats(accepted_per_pos=[0] * len(now.accepted_per_pos))
        m.inc("spec_decode_num_drafts_total", now.num_drafts - last.num_drafts)
        m.inc("spec_decode_num_draft_tokens_total", now.num_draft_tokens - last.num_draft_tokens)
        m.inc("spec_decode_num_accepted_tokens_total", now.num_accepted_tokens - last.num_accepted_tokens)
        for pos, (a, b) in enumerate(zip(now.accepted_per_pos, last.accepted_per_pos)):
            m.inc("spec_decode_num_accepted_tokens_per_pos_total", a - b, position=str(pos))
        self._last_spec = now

    async def _drain(self) -> None:
        self.draining = True
        if self.registration is not None:
            self.registration.draining = True
        while self.inflight > 0 or (self.engine.stats and (self.engine.stats.num_running or self.engine.stats.num_waiting)):
            await asyncio.sleep(0.05)
        # Leave routing before the server stops listening: a route handed out now would otherwise
        # point at a closed port.
        if self.registration is not None and self._registration_task is not None:
            await self.registration.stop()
            await asyncio.wait([self._registration_task], timeout=self.wcfg.rpc_timeout)


def build_configs(role: str, default_port: int, argv: Optional[list[str]]
                  ) -> tuple[WorkerConfig, EngineConfig, TracingConfig, TlsConfig, InternalAuthConfig]:
    ns = worker_parser(role, default_port).parse_args(argv)
    ecfg = EngineConfig.from_flags(ns)
    _require(role != "decode" or ecfg.cache.kv_offload_cpu_gb == 0, "kv_offload_cpu_gb",
             "lower KV tiers serve prompts computed here: give them to prefill and colocated ('both') workers "
             "(a decode worker reuses its device prefix cache only)")
    _require(role != "prefill" or ecfg.speculative is None, "speculative_config",
             "a prefill worker samples one token per request and never speculates: give it to decode and colocated "
             "('both') workers (pdmesh up --decode-args / --colocated-args)")
    return (from_flags(WorkerConfig, ns), ecfg, from_flags(TracingConfig, ns), from_flags(TlsConfig, ns),
            from_flags(InternalAuthConfig, ns))


def worker_main(role: str, default_port: int, serve: Callable[[WorkerRuntime], Awaitable[None]],
                argv: Optional[list[str]] = None) -> None:
    """Entry point of a worker process: flags -> configs -> ``serve(runtime)`` on uvloop."""
    import sys

    from pdmesh.log import configure_logging, run_async

    configure_logging(role)
    wcfg, ecfg, tcfg, tls, acfg = build_configs(role, default_port, sys.argv[1:] if argv is None else argv)
    run_async(lambda: serve(WorkerRuntime(ROLES[role], wcfg, ecfg, tcfg, tls, acfg)))
