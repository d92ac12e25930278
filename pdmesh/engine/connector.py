"""The engine's KV connector (decode side): pulls of remote KV in flight, as engine state.

A request whose prompt KV comes from another worker goes through these states::

    admit_remote ──▶ WAITING_FOR_KV (blocks allocated, nothing moving yet)
        start_pull ──▶ PULLING (a transfer writes the blocks; polled between steps)
            ├── DONE ─────────────────────▶ activated: queued to decode      outcome PULLED
            ├── FAILED / timed out ───────▶ policy 'recompute': re-prefilled  outcome RECOMPUTED
            │                               policy 'fail': dropped            outcome FAILED
            └── aborted (client gone) ────▶ dropped                          outcome FAILED (aborted)

Who owns a destination block during a transfer: the request (block manager entry under its id)
while it waits for and receives KV.  When the pull ends in any way other than DONE, the transfer
is cancelled; if the transport cannot say that it has certainly stopped writing (a CUDA copy
still queued, a NIXL READ not cancellable yet), the blocks are moved to a *quarantine* entry
(``STOPPING``) owned by the connector and freed only once the transfer reports it stopped; the
request itself goes on at once (recomputed into fresh blocks, or dropped).  So a block never
changes hands while a transfer may still write it.

The source is told when the transfer has *stopped* (``on_stopped``), not when the request's
outcome is known: a one-sided read keeps its pin on the source lease until then.

Copies between the pool and the lower KV tiers (``pdmesh.engine.offload``) are the same kind of
engine state and go through the same connector: a *load* (host or disk into a request's blocks)
is an entry like a pull (a ``TierLoadJob``, settled by the engine, stopped or quarantined like a
pull when the request goes away); an *offload* (blocks copied out of the pool to the host tier) is
a *hold*: the blocks it reads are owned by a connector key (``block_manager.pin``) until the copy
has stopped, then freed (cached still), like a quarantine that waits instead of cancelling.

Engine thread only.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pdmesh.kv.block_manager import PrefixCachingBlockManager
from pdmesh.transport.base import BaseKVTransport, BaseTransfer, PreparedPull, TransferState

log = logging.getLogger(__name__)


class PullOutcome(str, enum.Enum):
    """What became of a request whose KV was to be pulled."""

    PULLED = "pulled"
    """The KV arrived complete; the request decodes from its first token."""
    RECOMPUTED = "recomputed"
    """The pull failed; the request computes its prompt here (tokens identical)."""
    FAILED = "failed"
    """The pull failed under policy 'fail', or the request was aborted meanwhile."""


@dataclass(frozen=True)
class PullReport:
    """The outcome of one pull, handed to ``PullJob.on_outcome``."""

    outcome: PullOutcome
    transport: str
    bytes: int = 0
    blocks: int = 0
    seconds: float = 0.0
    """From the transfer's start in the engine until the engine saw it end (between steps)."""
    device_seconds: Optional[float] = None
    """The copy's own duration on the GPU (CUDA events), for transports that know it: what the
    transfer took, without the wait for the engine's next step boundary."""
    error: str = ""
    aborted: bool = False
    """The request was aborted (client gone, Abort) before its KV arrived."""

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class PullJob:
    """One request's pull, as the engine needs it."""

    request_id: str
    transport: BaseKVTransport
    prepared: Optional[PreparedPull]
    """None when preparing failed (``error`` says why): the pull fails at once."""
    first_block: int
    """Index in the request's block table of the first block to fill (the ones before it are
    local prefix-cache hits)."""
    policy: str = "recompute"
    """'recompute' or 'fail': what a failed pull does to the request."""
    on_outcome: Callable[[PullReport], object] = lambda r: None
    """Called once (engine thread) when the request's fate is known."""
    on_stopped: Callable[[], object] = lambda: None
    """Called once (engine thread) when the transfer has certainly stopped writing."""
    expect_checksums: list[int] = field(default_factory=list)
    """Per-block checksums of the source KV (``--kv-audit``), compared when the KV lands."""
    error: str = ""


@dataclass
class _Active:
    job: Any
    """A ``PullJob``, or a ``TierLoadJob`` (``request_id``, ``on_stopped``, ``error``)."""
    transfer: Optional[BaseTransfer]
    started: float
    deadline: float
    blocks: int


class KVConnector:
    """Pulls in flight by request id, and stopped-but-not-yet-quiet transfers in quarantine."""

    def __init__(self, blocks: PrefixCachingBlockManager) -> None:
        self.blocks = blocks
        self.active: dict[str, _Active] = {}
        self.stopping: dict[str, tuple[BaseTransfer, Callable[[], None]]] = {}
        """Quarantine key -> (transfer still possibly writing, its on_stopped)."""
        self.holds: dict[str, tuple[BaseTransfer, Callable[[], None]]] = {}
        """Hold key -> (a copy reading the key's blocks out of the pool, its on_stopped)."""
        self._seq = 0
        self.quarantined_total = 0
        """Transfers whose blocks had to wait in quarantine (counter)."""

    @property
    def pending(self) -> bool:
        return bool(self.active or self.stopping or self.holds)

    def has(self, request_id: str) -> bool:
        return request_id in self.active

    def quarantined_blocks(self) -> int:
        return sum(len(self.blocks.block_table(k)) for k in self.stopping if self.blocks.has_request(k))

    def add(self, job: Any, transfer: Optional[BaseTransfer], blocks: int, started: float,
            deadline: Optional[float] = None) -> None:
        """Track a started pull or tier load (``transfer`` None: it could not start); ``started``:
        monotonic time before the transport's ``start`` (a copy may complete inside it);
        ``deadline``: by default the prepared pull's."""
        if deadline is None:
            deadline = job.prepared.deadline if job.prepared is not None else started
        self.active[job.request_id] = _Active(job, transfer, started, deadline, blocks)

    def hold(self, key: str, copy: BaseTransfer, on_stopped: Callable[[], None]) -> None:
        """The blocks ``key`` holds (``block_manager.pin``) are read by ``copy``: free them, then call
        ``on_stopped``, once it has stopped (never cancelled: it runs to its end)."""
        self.holds[key] = (copy, on_stopped)

    def poll(self, now: Optional[float] = None) -> list[tuple[_Active, Optional[str]]]:
        """Advance every transfer.  Returns the pulls that ended as (entry, error or None for
        DONE); the caller settles the request.  Frees quarantined blocks whose transfer stopped."""
        now = time.monotonic() if now is None else now
        ended = []
        for rid, a in list(self.active.items()):
            err = self._check(a, now)
            if err is False:
                continue
            del self.active[rid]
            if err is not None:
                self._stop(rid, a, err)
            else:
                a.job.on_stopped()
            ended.append((a, err))
        for key, (xfer, on_stopped) in list(self.stopping.items()):
            if self._cancel(xfer):
                del self.stopping[key]
                self.blocks.free(key)
                on_stopped()
        for key, (xfer, on_stopped) in list(self.holds.items()):
            if xfer.poll() is not TransferState.RUNNING:
                del self.holds[key]
                self.blocks.free(key)
                on_stopped()
        return ended

    def _check(self, a: _Active, now: float):
        """False: still running; None: done; str: why it failed."""
        if a.transfer is None:
            return a.job.error or "the pull could not start"
        try:
            st = a.transfer.poll()
        except Exception as exc:  # noqa: BLE001 - a transport bug must not kill the engine
            log.exception("KV transfer of %s: poll raised", a.job.request_id)
            return f"transfer poll failed: {exc!r}"
        if st is TransferState.DONE:
            if now > a.deadline:  # finished after its pin on the source ended: not to be trusted
                return f"completed after its deadline ({now - a.started:.3f}s)"
            return None
        if st is TransferState.FAILED:
            return a.transfer.error or "transfer failed"
        if now > a.deadline:
            return f"timed out after {now - a.started:.1f}s"
        return False

    def _stop(self, rid: str, a: _Active, why: str) -> None:
        """The pull ended without its KV: make sure nothing writes the request's blocks later."""
        xfer = a.transfer
        if xfer is None or self._cancel(xfer):
            a.job.on_stopped()
            return
        self._seq += 1
        key = f"\x00kv-quarantine-{self._seq}-{rid}"
        self.blocks.reassign(rid, key)
        self.stopping[key] = (xfer, a.job.on_stopped)
        self.quarantined_total += 1
        log.warning("KV pull of %s stopped (%s) but may still write: %d blocks held until it stops",
                    rid, why, len(self.blocks.block_table(key)) if self.blocks.has_request(key) else 0)

    @staticmethod
    def _cancel(xfer: BaseTransfer) -> bool:
        try:
            return xfer.cancel()
        except Exception:  # noqa: BLE001 - cannot tell: keep the blocks until poll says it stopped
            log.exception("KV transfer cancel raised")
            return False

    def abort(self, request_id: str) -> Optional[_Active]:
        """The request is gone: stop its pull (quarantining its blocks if needed).  Returns the
        entry, or None when no pull was in flight."""
        a = self.active.pop(request_id, None)
        if a is not None:
            self._stop(request_id, a, "aborted")
        return a

    def info(self) -> dict[str, Any]:
        return {"active": len(self.active), "stopping": len(self.stopping), "holds": len(self.holds)}
