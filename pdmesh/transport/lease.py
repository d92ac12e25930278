"""Prefill side: KV held for transfer, under leases.

Every held request has exactly one entry here from the moment its first token is sampled until
its KV is freed, and the entry ends in exactly one call of ``free_fn`` — on ``release`` (decode
pulled it or gave up), ``abort``, or lease expiry, whichever comes first.  A pull in progress pins
the entry: a release or expiry that arrives meanwhile is carried out when the pull ends, so
blocks are never reused under a reader.

Deadlines: a lease expires ``ttl`` seconds after it was made or last pinned (soft), and in any case
``max_ttl`` seconds after it was made (hard, ``--kv-lease-max-seconds``): no pin is granted or
extended past it, and a pull still open then is ended by its server (``KVTransfer.Pull`` runs
under the hard deadline), so no reader can keep the blocks longer.

Each lease carries its capability (``pdmesh.transport.capability``): the token that Pull and
Release must present, the prompt hash, and the decode identity holding it once it pulled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from pdmesh.transport.capability import new_token

log = logging.getLogger(__name__)


@dataclass
class Lease:
    request_id: str
    block_ids: list[int]
    num_tokens: int
    deadline: float
    """time.monotonic() soft deadline (extended by pins, never past ``hard_deadline``)."""
    hard_deadline: float = float("inf")
    """time.monotonic() after which the lease grants nothing and ends as soon as it is unpinned."""
    pins: int = 0
    release_pending: bool = False
    token: str = ""
    """The capability Pull and Release must present."""
    prompt_hash: bytes = b""
    """SHA-256 of the prompt tokens whose KV the blocks hold."""
    holder: Optional[str] = None
    """The decode identity that pulled first (only it may pull again)."""


class LeaseTable:
    def __init__(self, free_fn: Callable[[str], None], ttl: float, max_ttl: Optional[float] = None) -> None:
        self.free_fn = free_fn
        self.ttl = ttl
        self.max_ttl = max(ttl, max_ttl if max_ttl is not None else 4 * ttl)
        self.leases: dict[str, Lease] = {}
        self.expired_total = 0
        """Leases that ended by expiry (a decode worker never pulled, or the hard limit)."""

    def add(self, request_id: str, block_ids: list[int], num_tokens: int, prompt_hash: bytes = b"") -> Lease:
        """Hold ``block_ids`` for ``request_id`` under a fresh lease token."""
        now = time.monotonic()
        lease = Lease(request_id, block_ids, num_tokens, now + self.ttl, now + self.max_ttl,
                      token=new_token(), prompt_hash=prompt_hash)
        self.leases[request_id] = lease
        return lease

    def get(self, request_id: str) -> Optional[Lease]:
        return self.leases.get(request_id)

    def held_blocks(self) -> int:
        return sum(len(lease.block_ids) for lease in self.leases.values())

    def pin(self, request_id: str) -> Optional[Lease]:
        """A pull's pin; None when the KV is gone, released or past its hard limit."""
        now = time.monotonic()
        lease = self.leases.get(request_id)
        if lease is None or lease.release_pending or now >= lease.hard_deadline:
            return None
        lease.pins += 1
        lease.deadline = min(lease.hard_deadline, max(lease.deadline, now + self.ttl))
        return lease

    def unpin(self, request_id: str) -> None:
        lease = self.leases.get(request_id)
        if lease is None:
            return
        lease.pins -= 1
        if lease.pins == 0 and lease.release_pending:
            self._end(lease)

    def release(self, request_id: str) -> bool:
        """Free the request's held KV (now, or when the pull in progress ends)."""
        lease = self.leases.get(request_id)
        if lease is None:
            return False
        if lease.pins:
            lease.release_pending = True
        else:
            self._end(lease)
        return True

    def _end(self, lease: Lease) -> None:
        if self.leases.pop(lease.request_id, None) is not None:
            self.free_fn(lease.request_id)

    def reap(self, now: Optional[float] = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [lease for lease in self.leases.values()
                   if min(lease.deadline, lease.hard_deadline) <= now and not lease.pins]
        for lease in expired:
            log.warning("KV lease of %s expired: freeing %d blocks", lease.request_id, len(lease.block_ids))
            self.expired_total += 1
            self._end(lease)
        return len(expired)

    async def reap_forever(self, interval: float = 0.25) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reap()
