"""The gateway's front door: a cap on client connections and a deadline on request headers.

A client that connects and then sends its request headers slowly or never (slowloris) holds a
file descriptor and a connection slot for as long as it likes in a plain uvicorn server; a few
thousand of them exhaust the process.  Here every HTTP connection is tracked:

* **Header deadline**: from the moment a connection waits for a request (it connected, or its
  previous response ended) it has ``--header-timeout`` seconds until that request's headers are
  complete; otherwise it is closed.  In-flight requests (headers received) are never cut.
* **Connection cap**: at ``--max-connections`` open connections, a new one makes room by closing
  the connection that has waited longest for its headers (a real client sends them within
  milliseconds: the old waiters are the attacker's); when every connection is busy with a request,
  the new one is closed.
* Every close is counted (``pdmesh:http_connections_closed_total{reason}``: ``header_timeout``,
  ``over_limit``) and logged (rate-limited); ``pdmesh:http_connections`` is the number open.

Implemented as a subclass of uvicorn's h11 protocol (``uvicorn.Config(http=...)``): a request's
headers are complete exactly when the protocol starts a new request/response cycle.
"""

from __future__ import annotations

import logging
import resource
import asyncio
from typing import Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

from pdmesh.log import RateLimitedLog
from pdmesh.metrics import ServiceMetrics

log = logging.getLogger(__name__)

RESERVED_FDS = 256
"""File descriptors kept for everything but client connections (gRPC channels, metrics, logs)."""


def connection_budget(wanted: int) -> int:
    """``wanted`` client connections if the open-files limit allows them (raising the soft limit
    toward the hard one as needed), else as many as it allows, with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        allowed = max(1, soft - RESERVED_FDS)
        log.warning("--max-connections %d needs %d open files but the limit is %d: capping client connections at %d",
                    wanted, need, soft, allowed)
        return allowed
    return wanted


class FrontDoor:
    """The connections of one HTTP listener and the rules above; ``protocol()`` is the class to give
    uvicorn.  Lives on the event loop thread (no locking)."""

    def __init__(self, max_connections: int, header_timeout: float, metrics: Optional[ServiceMetrics] = None) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.metrics = metrics
        self.open: set["_Guarded"] = set()
        self.awaiting: dict["_Guarded", float] = {}
        """Connections waiting for a request's headers -> since when (loop time), oldest first."""
        self.closed: dict[str, int] = {"over_limit": 0, "header_timeout": 0}
        self._log = RateLimitedLog(log)

    def protocol(self) -> type:
        door = self

        class GuardedH11Protocol(_Guarded):
            pass

        GuardedH11Protocol.door = door
        return GuardedH11Protocol

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.set("http_connections", len(self.open))

    def close(self, conn: "_Guarded", reason: str, detail: str) -> None:
        self.closed[reason] += 1
        if self.metrics is not None:
            self.metrics.inc("http_connections_closed_total", reason=reason)
        self._log.warning(reason, "closed client connection %s: %s", conn.peer, detail)
        conn.transport.close()
        self.open.discard(conn)
        self._count()

    def make_room(self, now: float) -> bool:
        """At the cap: close the connection that has waited longest for its headers; False if none may go."""
        for oldest, since in self.awaiting.items():
            self.awaiting.pop(oldest)
            self.close(oldest, "over_limit", f"{self.max_connections} connections open (--max-connections); it waited "
                       f"{now - since:.1f}s without sending request headers")
            return True
        return False


class _Guarded(H11Protocol):
    door: FrontDoor

    def connection_made(self, transport) -> None:  # type: ignore[override]
        door, now = self.door, self.loop.time()
        self._refused = False
        self._timer: Optional[asyncio.TimerHandle] = None
        if len(door.open) >= door.max_connections and not door.make_room(now):
            self._refused = True
            self.transport = transport
            door.close(self, "over_limit", f"{door.max_connections} connections open (--max-connections), all busy")
            return
        door.open.add(self)
        door._count()
        super().connection_made(transport)
        self._seen_cycle = self.cycle
        self._await_headers()

    @property
    def peer(self) -> str:
        info = self.transport.get_extra_info("peername") if self.transport is not None else None
        return f"{info[0]}:{info[1]}" if info else "?"

    def _await_headers(self) -> None:
        self.door.awaiting[self] = self.loop.time()
        self._timer = self.loop.call_later(self.door.header_timeout, self._too_slow)

    def _headers_done(self) -> None:
        self._seen_cycle = self.cycle
        self.door.awaiting.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self.door.awaiting.pop(self, None) is not None and not self.transport.is_closing():
            self.door.close(self, "header_timeout", f"no complete request headers within {self.door.header_timeout:g}s "
                            "(--header-timeout)")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._seen_cycle:  # a request's headers are complete
            self._headers_done()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not self._seen_cycle:  # a pipelined request started at once
            self._headers_done()
        elif not self.transport.is_closing() and self not in self.door.awaiting:
            self._await_headers()

    def connection_lost(self, exc) -> None:
        if self._refused:
            return
        self.door.open.discard(self)
        self.door._count()
        self.door.awaiting.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)
