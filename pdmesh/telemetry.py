"""OpenTelemetry tracing, one ``Telemetry`` per service process.

Spans form one trace per request across processes: the parent comes from the ``traceparent``
in the incoming HTTP header or gRPC metadata, and ``traceparent(span)`` is what a service sends on
its own calls.  Export follows the standard ``OTEL_*`` variables (read in ``pdmesh.env``) unless the
flags say otherwise: OTLP over gRPC or HTTP, console, or off.  Off means no provider and a no-op
span: nothing is recorded, nothing allocated per token.  Prompt and completion text go into spans
only with ``--trace-include-text``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

from pdmesh.config import _require, check_choices
from pdmesh.env import ENV
from pdmesh.rpc import tracecontext

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TracingConfig:
    """Where spans go."""

    tracing: Literal["auto", "otlp", "console", "off"] = "auto"
    """'auto' (the standard OTEL_TRACES_EXPORTER: otlp, console, none), 'otlp', 'console' or 'off'."""
    otlp_endpoint: Optional[str] = None
    """OTLP collector (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT)."""
    otlp_protocol: Optional[Literal["grpc", "http/protobuf"]] = None
    """'grpc' or 'http/protobuf' (default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc)."""
    trace_token_events: int = 1
    """Record a span event for every Nth token (1: every token; 0: none)."""
    trace_include_text: bool = False
    """Put prompt and completion text into spans (never otherwise)."""

    def __post_init__(self) -> None:
        check_choices(self)
        _require(self.trace_token_events >= 0, "trace_token_events", "must be >= 0")

    def mode(self) -> str:
        if self.tracing != "auto":
            return self.tracing
        if ENV.OTEL_SDK_DISABLED.get():
            return "off"
        env = ENV.OTEL_TRACES_EXPORTER.get().lower()
        return env if env in ("otlp", "console") else "off"


class Telemetry:
    def __init__(self, cfg: TracingConfig, service: str) -> None:
        self.cfg = cfg
        self.service = service
        self.enabled = cfg.mode() != "off"
        self.every = cfg.trace_token_events
        self._provider: Optional[TracerProvider] = None
        self._tracer: Optional[Tracer] = None
        if self.enabled:
            self._setup(cfg.mode())

    def _setup(self, mode: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        provider = TracerProvider(resource=Resource.create({"service.name": f"pdmesh-{self.service}"}))
        exporter: SpanExporter
        if mode == "console":
            exporter = ConsoleSpanExporter()
        else:
            protocol = self.cfg.otlp_protocol or ENV.OTEL_EXPORTER_OTLP_PROTOCOL.get()
            endpoint = self.cfg.otlp_endpoint or ENV.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.get() or ENV.OTEL_EXPORTER_OTLP_ENDPOINT.get()
            if protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

                endpoint = endpoint or "http://localhost:4318"
                exporter = HttpExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(endpoint=endpoint or "http://localhost:4317", insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self._provider = provider
        self._tracer = provider.get_tracer("pdmesh")
        log.info("tracing: %s export for pdmesh-%s", mode, self.service)

    def start(self, name: str, parent: Optional[str], attributes: Optional[dict[str, Any]] = None):
        """A server span, child of the W3C ``parent`` (or of the current span); a no-op span when off."""
        from opentelemetry import trace

        if not self.enabled:
            return trace.INVALID_SPAN
        ctx = None
        if tracecontext.valid(parent):
            _, t, s, f = parent.split("-")
            sc = trace.SpanContext(int(t, 16), int(s, 16), is_remote=True, trace_flags=trace.TraceFlags(int(f, 16)))
            ctx = trace.set_span_in_context(trace.NonRecordingSpan(sc))
        assert self._tracer is not None  # _setup made it: tracing is enabled
        return self._tracer.start_span(name, context=ctx, kind=trace.SpanKind.SERVER, attributes=attributes or {})

    def child_span(self, name: str, parent_span, attributes: Optional[dict[str, Any]] = None):
        from opentelemetry import trace

        if not self.enabled:
            return trace.INVALID_SPAN
        assert self._tracer is not None  # _setup made it: tracing is enabled
        return self._tracer.start_span(name, context=trace.set_span_in_context(parent_span), attributes=attributes or {})

    def traceparent(self, span, fallback: Optional[str]) -> str:
        """What to send downstream: the span's own context, else a child of ``fallback``."""
        if self.enabled:
            sc = span.get_span_context()
            if sc.is_valid:
                return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
        return tracecontext.child(fallback)

    def token_event(self, span, index: int, **attrs: Any) -> None:
        if self.enabled and self.every and index % self.every == 0:
            span.add_event("gen_ai.token", {"gen_ai.token.index": index, **attrs})

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
