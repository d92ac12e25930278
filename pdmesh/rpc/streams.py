"""Streams that never go silent: a worker's response stream carries a heartbeat message (an empty
message, which callers skip) whenever it has had nothing to say for ``STREAM_HEARTBEAT_S``; a caller
that hears nothing for its idle deadline (several heartbeats) knows the peer is stuck — an event
loop blocked, or a peer frozen in a way keepalive pings cannot see — and ends or fails over the
request instead of waiting for its overall deadline."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, TypeVar

T = TypeVar("T")

STREAM_HEARTBEAT_S = 1.0
"""Seconds a worker's response stream may be silent before it sends a heartbeat message."""


async def with_heartbeats(source: AsyncIterator[T], heartbeat: Callable[[], T],
                          every: float = STREAM_HEARTBEAT_S) -> AsyncIterator[T]:
    """``source``'s items, with ``heartbeat()`` in between whenever it produced nothing for
    ``every`` seconds.  The source runs in its own task (one per phase of a call, not per item: use
    it around waits such as a KV pull, not around a token stream); closing or cancelling this
    generator cancels it."""
    it = source.__aiter__()
    nxt: "asyncio.Future[T] | None" = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=every)
            if not done:
                yield heartbeat()
                continue
            fut, nxt = nxt, None
            try:
                item = fut.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            await asyncio.gather(nxt, return_exceptions=True)
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()
