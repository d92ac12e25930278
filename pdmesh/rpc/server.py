"""gRPC server construction, health checking and graceful shutdown on signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Awaitable, Callable, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdmesh.log import StartupError

if TYPE_CHECKING:
    from pdmesh.rpc.auth import BaseAuthenticator
    from pdmesh.rpc.tls import TlsConfig

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20
"""Largest message a channel receives (a KV chunk of one large-model block fits) and a server sends."""
MAX_REQUEST_BYTES = 8 << 20
"""Largest message an internal server receives (a prompt of 1.6M token ids): gRPC refuses a bigger
one from its length prefix with RESOURCE_EXHAUSTED, before buffering it."""
KEEPALIVE_S = 3.0
"""Every connection pings its peer after this many seconds without reads; with ``PING_TIMEOUT_S``,
a frozen peer (SIGSTOP, a dead host, a cut link) fails every call on the connection within
KEEPALIVE_S + PING_TIMEOUT_S (UNAVAILABLE)."""
PING_TIMEOUT_S = KEEPALIVE_S
"""Seconds an HTTP/2 ping waits for its ack.  gRPC's own default (60 s) overrides keepalive_timeout
for keepalive pings too, which is why a frozen peer once went unnoticed for minutes."""


def keepalive_options(seconds: float = KEEPALIVE_S) -> list[tuple[str, int]]:
    """Ping the peer after ``seconds`` without reads and give the ping as long: a frozen or
    unreachable peer fails the connection's calls within twice ``seconds``."""
    ms = int(seconds * 1000)
    return [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms), ("grpc.http2.ping_timeout_ms", ms),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]


def channel_options(keepalive_s: float = KEEPALIVE_S) -> list[tuple[str, int]]:
    """Options of a channel to a mesh peer: message limits and keepalive (``keepalive_options``)."""
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)] + keepalive_options(keepalive_s)


CHANNEL_OPTIONS = channel_options()
# grpc turns SO_REUSEPORT on by default: a second server on a port already taken would then bind
# "successfully" and the kernel would split connections between the two (clients reaching the wrong
# service get UNIMPLEMENTED).  Off, a port clash is an error at start-up.  Peers' keepalive pings
# (every KEEPALIVE_S) are welcome: at most one a second is allowed without strikes.
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
] + keepalive_options() + [
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
    ("grpc.so_reuseport", 0),
]


def make_server(auth: Optional["BaseAuthenticator"] = None,
                on_refused: Optional[Callable[[str, grpc.StatusCode], None]] = None) -> grpc.aio.Server:
    """A gRPC server with the mesh's limits and keepalive; with ``auth``, every call but health
    checks is authenticated and authorized (``pdmesh.rpc.authz``)."""
    interceptors = []
    if auth is not None:
        from pdmesh.rpc.authz import AuthInterceptor

        interceptors.append(AuthInterceptor(auth, on_refused=on_refused))
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)


class Health:
    """The standard grpc.health.v1 service; ``set_serving`` flips every listed service."""

    def __init__(self, server: grpc.aio.Server, services: list[str]) -> None:
        self.servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self.services = [""] + services

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services:
            res = self.servicer.set(name, status)
            if asyncio.iscoroutine(res):
                await res


def bind(server: grpc.aio.Server, host: str, port: int, tls: Optional["TlsConfig"] = None, flag: str = "--port") -> int:
    """Listen on host:port (0: a free port), over TLS when ``tls`` is enabled; the bound port.
    A port that cannot be bound (in use) raises ``StartupError`` naming ``flag``."""
    addr = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(addr, tls.server_credentials()) if tls is not None and tls.enabled
                 else server.add_insecure_port(addr))
    except RuntimeError:  # grpcio raises on a failed bind (older versions return 0)
        bound = 0
    if bound == 0:
        raise StartupError(f"cannot listen on {addr} ({flag}): the port is in use or the address is not this host's")
    return bound


def ignore_further_signals() -> None:
    """Once draining has begun, a repeated SIGINT/SIGTERM (Ctrl-C reaches the whole process group,
    and ``pdmesh up`` forwards its own) must not kill the process mid-drain; SIGKILL still does."""
    try:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    except RuntimeError:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


async def wait_for_signal() -> str:
    """Resolve on SIGINT/SIGTERM (ignoring any later ones); returns the signal's name."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    def resolve(s: signal.Signals) -> None:
        if not fut.done():
            fut.set_result(s.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, resolve, sig)
    name = await fut
    ignore_further_signals()
    return name


async def serve_until_signal(server: grpc.aio.Server, health_: Optional[Health], drain_timeout: float,
                             on_drain: Optional[Callable[[], Awaitable[None]]] = None,
                             fatal: Optional[asyncio.Future] = None) -> Optional[str]:
    """Run until SIGINT/SIGTERM, then: NOT_SERVING, ``on_drain()``, stop with a grace period.
    ``fatal``: a future whose result (why the process cannot serve: its engine or a rank died) stops
    it at once instead, without draining; returned."""
    sig = asyncio.ensure_future(wait_for_signal())
    waiting = {sig} if fatal is None else {sig, fatal}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if fatal is not None and fatal.done() and not sig.done():
        sig.cancel()
        why = str(fatal.result())
        log.error("cannot serve any more (%s): stopping without draining", why)
        ignore_further_signals()
        if health_ is not None:
            await health_.set_serving(False)
        await server.stop(grace=1.0)
        return why
    name = sig.result()
    log.info("%s: draining (up to %.1fs)", name, drain_timeout)
    if health_ is not None:
        await health_.set_serving(False)
    if on_drain is not None:
        try:
            await asyncio.wait_for(on_drain(), drain_timeout)
        except asyncio.TimeoutError:
            log.warning("drain timed out")
    await server.stop(grace=1.0)
    return None
