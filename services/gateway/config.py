"""Gateway configuration."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pdmesh.config import ModelConfig, _require, add_flags, check_choices, from_flags
from pdmesh.env import ENV
from pdmesh.openai.tools import ToolParserName
from pdmesh.rpc.auth import InternalAuthConfig
from pdmesh.rpc.streams import STREAM_HEARTBEAT_S
from pdmesh.rpc.tls import TlsConfig
from pdmesh.telemetry import TracingConfig


@dataclass(frozen=True)
class GatewayConfig:
    """The OpenAI-compatible HTTP front door."""

    host: str = "0.0.0.0"
    """Address the HTTP server binds."""
    port: int = 8000
    """HTTP port."""
    grpc_port: int = 50050
    """Port of the public gRPC API (pdmesh.v1.Inference, health, reflection); -1: off."""
    metrics_port: int = 8080
    """Port of the gateway's Prometheus /metrics (-1: off)."""
    scheduler: str = "127.0.0.1:50051"
    """host:port of the scheduler."""
    api_key: tuple[str, ...] = ()
    """API keys (repeat the flag for several): when any key is configured (here, in --api-key-file
    or in $PDMESH_API_KEY), every route but /health and /version requires 'Authorization: Bearer
    <key>' with one of them (the gRPC API: that metadata)."""
    api_key_file: Optional[str] = None
    """File of API keys, one per line (blank lines and lines starting with '#' skipped)."""
    ssl_certfile: Optional[str] = None
    """TLS certificate (PEM) for the client-facing listeners: HTTP and the public gRPC API."""
    ssl_keyfile: Optional[str] = None
    """Private key (PEM) of --ssl-certfile."""
    max_request_bytes: int = 4 << 20
    """Request bodies above this get 413."""
    max_n: int = 16
    """Largest 'n' accepted."""
    max_stop: int = 16
    """Most stop strings per request."""
    max_inflight: int = 1024
    """Requests handled at once; beyond it, 429 with Retry-After."""
    request_timeout: float = 600.0
    """Deadline of one request across prefill and decode (seconds)."""
    route_timeout: float = 5.0
    """Deadline of a scheduler Route call (seconds)."""
    drain_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM."""
    reasoning_parser: Literal["auto", "think", "none"] = "auto"
    """'auto' (split <think> when the tokenizer has that token), 'think', or 'none'."""
    stream_idle_timeout: float = 10.0
    """Seconds a worker's token stream may stay silent (workers send a heartbeat every second while a
    request waits) before the request ends with an error: the worker is stuck or frozen."""
    keepalive: float = 3.0
    """Seconds a connection to the scheduler or a worker may go without reads before the gateway
    pings it, and the ping's own deadline: a frozen or unreachable peer fails its calls within twice
    this (requests before their first token go to another worker, the others end with an error)."""
    max_connections: int = 2048
    """Client HTTP connections open at once; beyond it the connection that has waited longest for
    its request headers is closed to make room, or, when every connection is busy, the new one."""
    header_timeout: float = 10.0
    """Seconds a client connection gets to send a request's headers (from connecting, or from its
    previous response); slower ones are closed (slowloris), logged and counted."""
    tool_call_parser: Optional[ToolParserName] = None
    """How tool calls are read from the model's text when tool_choice is 'auto': 'hermes'
    (<tool_call>{...}</tool_call>: Qwen2.5, Qwen3, Hermes) or 'llama3_json' (Llama 3.1/3.2)."""
    enable_auto_tool_choice: bool = False
    """Let the model decide whether to call tools (tool_choice 'auto'); needs --tool-call-parser."""
    chat_template: Optional[str] = None
    """A Jinja chat template file that replaces the tokenizer's own."""
    access_log: bool = True
    """One log line per request: method, route, status, latency, request id (never prompt text)."""

    def __post_init__(self) -> None:
        check_choices(self)
        _require(0 <= self.port < 65536, "port", "must be in 0..65535")
        _require(self.max_request_bytes > 0, "max_request_bytes", "must be > 0")
        _require(self.max_n >= 1 and self.max_inflight >= 1, "max_n", "limits must be >= 1")
        _require(all(k.strip() for k in self.api_key), "api_key", "must not be empty")
        _require(bool(self.ssl_certfile) == bool(self.ssl_keyfile), "ssl_keyfile", "give --ssl-certfile and --ssl-keyfile together")
        _require(not self.enable_auto_tool_choice or self.tool_call_parser is not None, "enable_auto_tool_choice",
                 "needs --tool-call-parser")
        _require(self.chat_template is None or Path(self.chat_template).is_file(), "chat_template",
                 f"no such file: {self.chat_template}")
        _require(self.stream_idle_timeout > 2 * STREAM_HEARTBEAT_S, "stream_idle_timeout",
                 f"must exceed two worker heartbeats ({2 * STREAM_HEARTBEAT_S:g}s)")
        _require(self.max_connections >= 1, "max_connections", "must be >= 1")
        _require(self.keepalive >= 1, "keepalive", "must be >= 1 (peers refuse more frequent pings)")
        _require(self.header_timeout > 0, "header_timeout", "must be > 0")

    def api_keys(self) -> frozenset[str]:
        """Every configured key: --api-key, --api-key-file and $PDMESH_API_KEY (comma-separated)."""
        keys = {k.strip() for k in self.api_key}
        if self.api_key_file:
            lines = [ln.strip() for ln in Path(self.api_key_file).read_text().splitlines()]
            from_file = {ln for ln in lines if ln and not ln.startswith("#")}
            if not from_file:
                raise ValueError(f"--api-key-file {self.api_key_file} holds no key")
            keys |= from_file
        keys |= {k.strip() for k in ENV.API_KEY.get().split(",") if k.strip()}
        return frozenset(keys)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdmesh gateway", description="pdmesh OpenAI-compatible gateway")
    add_flags(p, GatewayConfig)
    add_flags(p, ModelConfig, skip=("dtype", "seed"))
    add_flags(p, TracingConfig)
    add_flags(p, TlsConfig)
    add_flags(p, InternalAuthConfig)
    return p


def build(argv: Optional[list[str]]) -> tuple[GatewayConfig, ModelConfig, TracingConfig, TlsConfig, InternalAuthConfig]:
    ns = parser().parse_args(argv)
    return (from_flags(GatewayConfig, ns), from_flags(ModelConfig, ns), from_flags(TracingConfig, ns), from_flags(TlsConfig, ns),
            from_flags(InternalAuthConfig, ns))
