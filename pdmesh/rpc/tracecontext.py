"""W3C trace context (``traceparent``) carried in gRPC metadata between services.

Format: ``00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>``. The gateway honours an
incoming header or starts a trace; each call carries the caller's current span as the parent.
OpenTelemetry spans (``pdmesh.telemetry``) attach to the same header.
"""

from __future__ import annotations

import re
import secrets
from typing import Optional, TypeGuard

KEY = "traceparent"
_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def valid(tp: Optional[str]) -> TypeGuard[str]:
    m = _RE.match(tp or "")
    return m is not None and m.group(1) != "0" * 32 and m.group(2) != "0" * 16


def new() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child(tp: Optional[str]) -> str:
    """Same trace, new span id (a fresh trace when ``tp`` is missing or malformed)."""
    if not valid(tp):
        return new()
    _, trace, _, flags = tp.split("-")
    return f"00-{trace}-{secrets.token_hex(8)}-{flags}"


def trace_id(tp: Optional[str]) -> str:
    return tp.split("-")[1] if valid(tp) else "-"


def metadata(tp: Optional[str]) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying ``tp`` (the caller's current span), or a new trace."""
    return ((KEY, tp if valid(tp) else new()),)


def from_context(context) -> Optional[str]:
    """The ``traceparent`` a gRPC servicer was called with (None if absent or malformed)."""
    for key, value in context.invocation_metadata() or ():
        if key == KEY and valid(value):
            return value
    return None
