"""Prometheus metrics with vLLM's names under a ``pdmesh:`` prefix, one registry per process.

Every series carries ``model_name``, ``role`` (gateway, scheduler, prefill, decode) and
``instance``. ``ServiceMetrics.serve(port)`` exposes ``/metrics`` on its own HTTP port (0 picks a
free one; the bound port is returned and workers register it with the scheduler).

What each role reports (the dashboard in deploy/grafana reads exactly these):
* gateway: per-request latencies (TTFT, TPOT, ITL, E2E), prompt/generation lengths, successes by
  finish reason, failures by reason, aborts, KV transfer bytes/seconds by transport, in flight.
* prefill: queue time, prompt and prefix-cache counters, KV held for transfer, running/waiting.
* decode: generated tokens, KV transfers by transport, running/waiting, KV usage.
* both (colocated): what prefill and decode report, without transfers.
* every worker: engine step time by kind (the stack's own cost is client TPOT / decode step time).
* prefill/both with lower KV tiers: hits, misses, bytes and seconds of offloads and loads (GB/s),
  dropped and corrupt blocks, occupancy, by tier (host, disk).
* decode and colocated with ``--speculative-config``: vLLM's spec_decode counters (drafts, draft
  tokens, accepted tokens, accepted tokens per position).
"""

from __future__ import annotations

import asyncio
from typing import Iterable, Optional

from pdmesh.log import StartupError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

PREFIX = "pdmesh:"
LABELS = ("model_name", "role", "instance")

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)
_STEP = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03,
         0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)

# name -> (kind, documentation, extra labels, buckets)
SPECS: dict[str, tuple[str, str, tuple[str, ...], Optional[tuple]]] = {
    "time_to_first_token_seconds": ("histogram", "Time to first token (gateway, client view).", (), _LATENCY),
    "time_per_output_token_seconds": ("histogram", "Mean time per output token after the first, per request.", (), _LATENCY),
    "inter_token_latency_seconds": ("histogram", "Time between consecutive streamed token chunks.", (), _LATENCY),
    "e2e_request_latency_seconds": ("histogram", "Request latency from arrival to last token.", (), _LATENCY),
    "request_queue_time_seconds": ("histogram", "Time a request waited in a worker's queue.", (), _LATENCY),
    "request_prefill_time_seconds": ("histogram", "Prefill/colocated: time from a request's first scheduling to its first token.", (), _LATENCY),
    "engine_step_seconds": ("histogram", "Duration of one engine step that produced tokens, by kind (decode: one token per "
                            "sequence; prefill; mixed).", ("kind",), _STEP),
    "request_prompt_tokens": ("histogram", "Prompt length per request.", (), _TOKENS),
    "request_generation_tokens": ("histogram", "Generated tokens per request.", (), _TOKENS),
    "kv_transfer_seconds": ("histogram", "Duration of one request's KV transfer.", ("transport",), _LATENCY),
    "num_requests_running": ("gauge", "Requests in the batch (workers) or in flight (gateway).", (), None),
    "num_requests_waiting": ("gauge", "Requests queued for a batch slot.", (), None),
    "kv_cache_usage_perc": ("gauge", "Fraction of KV blocks in use (0-1).", (), None),
    "kv_blocks_free": ("gauge", "KV blocks with no owner (cached ones included).", (), None),
    "kv_blocks_held_for_transfer": ("gauge", "Prefill: KV blocks held under a lease for a decode worker.", (), None),
    "engine_step_tokens_total": ("counter", "Tokens sampled by engine steps, by step kind.", ("kind",), None),
    "engine_step_token_seconds_total": ("counter", "Sum over engine steps of step time x tokens sampled in it, by kind "
                                        "(over engine_step_tokens_total: the step time an output token waited for).",
                                        ("kind",), None),
    "prompt_tokens_total": ("counter", "Prompt tokens processed.", (), None),
    "generation_tokens_total": ("counter", "Tokens generated.", (), None),
    "request_success_total": ("counter", "Requests that finished, by finish reason.", ("finished_reason",), None),
    "request_failure_total": ("counter", "Requests that failed, by reason.", ("reason",), None),
    "num_aborted_requests_total": ("counter", "Requests aborted (client gone or cancelled).", (), None),
    "prefix_cache_queries_total": ("counter", "Prompt tokens looked up in the prefix cache.", (), None),
    "prefix_cache_hits_total": ("counter", "Prompt tokens found in the prefix cache.", (), None),
    "kv_transfer_bytes_total": ("counter", "KV bytes moved between workers, by transport.", ("transport",), None),
    "kv_transfer_failures_total": ("counter", "Decode: KV pulls that failed, by what was done (recompute, fail).", ("action",), None),
    "kv_nixl_staging_fallbacks_total": ("counter", "NIXL reads that found a staging arena (--nixl-staging-mb) full, by side: source (read "
                                        "from its pool block by block), destination (block by block into the pool, or, between "
                                        "tensor-parallel sizes, through a buffer registered for the pull).", ("side",), None),
    "kv_nixl_reads_total": ("counter", "Decode: NIXL READs posted (one per source rank of a pull), by kind: unstaged (from the peer's "
                            "pool, one region per (layer, block)), staged (a packed region into this worker's arena, then landed), "
                            "direct (a packed region straight into consecutive blocks), fallback (a packed region with this arena "
                            "full).", ("kind",), None),
    "kv_nixl_staging_used_bytes": ("gauge", "Bytes of this worker's NIXL staging arena taken by reads in flight (prefill: by leases).", (), None),
    "kv_tier_hits_total": ("counter", "Prompt tokens loaded from a lower KV tier (host, disk) instead of recomputed.", ("tier",), None),
    "kv_tier_misses_total": ("counter", "Prompt tokens looked up in a lower KV tier (past the tiers above it) and not found there.", ("tier",), None),
    "kv_tier_offload_bytes_total": ("counter", "KV bytes written into a lower tier (host: from the device; disk: from host memory).",
                                    ("tier",), None),
    "kv_tier_offload_seconds_total": ("counter", "Time spent copying KV into a lower tier (bytes over it: GB/s).", ("tier",), None),
    "kv_tier_load_bytes_total": ("counter", "KV bytes loaded out of a lower tier (host: to the device; disk: to host memory).", ("tier",), None),
    "kv_tier_load_seconds_total": ("counter", "Time spent loading KV out of a lower tier (bytes over it: GB/s).", ("tier",), None),
    "kv_tier_dropped_blocks_total": ("counter", "KV blocks not written into a lower tier (full of blocks in use, or disk behind).", ("tier",), None),
    "kv_tier_corrupt_blocks_total": ("counter", "Disk KV blocks refused on read (checksum, truncated, header): misses, never served.",
                                     ("tier",), None),
    "kv_tier_usage_bytes": ("gauge", "Bytes of KV held in a lower tier.", ("tier",), None),
    "kv_tier_capacity_bytes": ("gauge", "Size limit of a lower KV tier.", ("tier",), None),
    "kv_audit_mismatches_total": ("counter", "KV blocks whose prompt KV changed while owned or arrived different from the source (--kv-audit).",
                                  (), None),
    "kv_transfer_faults_injected_total": ("counter", "Prefill: KV pulls corrupted by --inject-kv-faults.", ("mode",), None),
    "spec_decode_num_drafts_total": ("counter", "Speculative decoding: verify steps of a sequence that carried draft tokens.", (), None),
    "spec_decode_num_draft_tokens_total": ("counter", "Speculative decoding: draft tokens verified.", (), None),
    "spec_decode_num_accepted_tokens_total": ("counter", "Speculative decoding: draft tokens accepted.", (), None),
    "spec_decode_num_accepted_tokens_per_pos_total": ("counter", "Speculative decoding: draft tokens accepted at each "
                                                      "position of their proposal (0-based).", ("position",), None),
    "requests_received_total": ("counter", "Gateway: generation requests received (before validation).", (), None),
    "requests_finished_total": ("counter", "Gateway: requests that reached the mesh and ended, by outcome (ok, error, aborted).", ("outcome",), None),
    "requests_rejected_total": ("counter", "Gateway: requests refused before reaching the mesh, by HTTP status.", ("status",), None),
    "internal_calls_refused_total": ("counter", "Internal gRPC calls refused: UNAUTHENTICATED (no or bad credentials) or "
                                     "PERMISSION_DENIED (role not allowed), by method.", ("method", "code"), None),
    "http_connections": ("gauge", "Gateway: open client HTTP connections.", (), None),
    "http_connections_closed_total": ("counter", "Gateway: client connections it closed, by reason (over_limit: "
                                      "--max-connections reached; header_timeout: headers not sent within "
                                      "--header-timeout).", ("reason",), None),
    "event_loop_lag_seconds": ("histogram", "How late the asyncio event loop ran a timer (stalls).", (), _LATENCY),
    "event_loop_lag_max_seconds": ("gauge", "Largest event-loop lag seen since start.", (), None),
    "asyncio_tasks": ("gauge", "asyncio tasks alive in this process.", (), None),
}


PROCESS_SERIES = {"process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
                  "process_cpu_seconds_total", "process_open_fds", "process_max_fds"}
"""prometheus_client's process collector (Linux), registered in every service's registry."""


def exported_names() -> set[str]:
    """Every series name a scrape can contain (histogram/counter suffixes included)."""
    out = set(PROCESS_SERIES)
    for name, (kind, _, _, _) in SPECS.items():
        full = PREFIX + name
        if kind == "histogram":
            out |= {full + "_bucket", full + "_sum", full + "_count", full + "_created"}
        elif kind == "counter":
            out |= {full, full.removesuffix("_total") + "_created"}
        else:
            out.add(full)
    return out


class ServiceMetrics:
    """The metrics of one service process (its own registry: no global state)."""

    def __init__(self, model_name: str, role: str, instance: str) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_open_fds, ...
        self.base = {"model_name": model_name, "role": role, "instance": instance}
        self._m: dict[str, Counter | Gauge | Histogram] = {}
        for name, (kind, doc, extra, buckets) in SPECS.items():
            labels = LABELS + extra
            if kind == "histogram":
                assert buckets is not None  # every histogram in SPECS names its buckets
                self._m[name] = Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)
            elif kind == "counter":
                self._m[name] = Counter(PREFIX + name.removesuffix("_total"), doc, labels, registry=self.registry)
            else:
                self._m[name] = Gauge(PREFIX + name, doc, labels, registry=self.registry)
            if not extra:
                self._m[name].labels(**self.base)  # present (at 0) from the first scrape
        self.port = 0

    def _get(self, name: str, **extra: str):
        return self._m[name].labels(**self.base, **extra)

    def observe(self, name: str, value: float, **extra: str) -> None:
        self._get(name, **extra).observe(value)

    def inc(self, name: str, value: float = 1.0, **extra: str) -> None:
        if value:
            self._get(name, **extra).inc(value)

    def set(self, name: str, value: float, **extra: str) -> None:
        self._get(name, **extra).set(value)

    def observe_many(self, name: str, values: Iterable[float]) -> None:
        h = self._get(name)
        for v in values:
            h.observe(v)

    def refused_call(self, method: str, code) -> None:
        """An internal call refused by authentication or authorization (``AuthInterceptor``)."""
        self.inc("internal_calls_refused_total", method=method.rsplit(".", 1)[-1], code=code.name)

    def serve(self, port: int, host: str = "0.0.0.0", flag: str = "--metrics-port") -> int:
        """Serve /metrics on ``port`` (0: any free port); returns the bound port. A port in use
        raises ``StartupError`` naming ``flag``."""
        try:
            httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise StartupError(f"cannot serve /metrics on {host}:{port} ({flag}): {exc.strerror or exc}") from None
        self.port = httpd.server_port
        return self.port


async def watch_event_loop(metrics: Optional[ServiceMetrics], interval: float = 0.05) -> None:
    """Run forever on the loop being watched: every ``interval`` measure how late a timer fired
    (a blocked loop shows up as lag) and count live tasks."""
    if metrics is None:
        return
    loop = asyncio.get_running_loop()
    worst = 0.0
    while True:
        t0 = loop.time()
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - t0 - interval)
        metrics.observe("event_loop_lag_seconds", lag)
        if lag > worst:
            worst = lag
            metrics.set("event_loop_lag_max_seconds", worst)
        metrics.set("asyncio_tasks", len(asyncio.all_tasks(loop)))
