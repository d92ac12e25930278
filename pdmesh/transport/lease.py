"""Prefill side: KV held for transfer, under leases.

Every held request has exactly one entry here from the moment its first token is sampled until
its KV is freed, and the entry ends in exactly one call of ``free_fn`` — on ``release`` (decode
pulled it or gave up), ``abort``, or lease expiry, whichever comes first.  A pull in progress pins
the entry: a release or expiry that arrives meanwhile is carried out when the pull ends, so
blocks are never reused under a reader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger(__name__)


@dataclass
class Lease:
    request_id: str
    block_ids: list[int]
    num_tokens: int
    deadline: float
    """time.monotonic() deadline."""
    pins: int = 0
    release_pending: bool = False


class LeaseTable:
    def __init__(self, free_fn: Callable[[str], None], ttl: float) -> None:
        self.free_fn = free_fn
        self.ttl = ttl
        self.leases: dict[str, Lease] = {}
        self.expired_total = 0
        """Leases that ended by expiry (a decode worker never pulled)."""

    def add(self, request_id: str, block_ids: list[int], num_tokens: int) -> Lease:
        lease = Lease(request_id, block_ids, num_tokens, time.monotonic() + self.ttl)
        self.leases[request_id] = lease
        return lease

    def get(self, request_id: str) -> Optional[Lease]:
        return self.leases.get(request_id)

    def held_blocks(self) -> int:
        return sum(len(lease.block_ids) for lease in self.leases.values())

    def pin(self, request_id: str) -> Optional[Lease]:
        lease = self.leases.get(request_id)
        if lease is None or lease.release_pending:
            return None
        lease.pins += 1
        lease.deadline = max(lease.deadline, time.monotonic() + self.ttl)
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
        expired = [lease for lease in self.leases.values() if lease.deadline <= now and not lease.pins]
        for lease in expired:
            log.warning("KV lease of %s expired: freeing %d blocks", lease.request_id, len(lease.block_ids))
            self.expired_total += 1
            self._end(lease)
        return len(expired)

    async def reap_forever(self, interval: float = 0.25) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reap()
