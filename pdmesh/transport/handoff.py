"""The decode side of the KV hand-off, from asyncio: one path, used by the decode servicer, the
test helpers (``pdmesh.testing``) and the integration tests.

``KVHandoff.take(...)``:

1. checks the descriptor (a transport offered here, the prompt's length) — else the source is
   released and ``HandoffError`` raised;
2. admits the prompt in the engine (allocates blocks, local prefix-cache hits kept) — no room:
   ``HandoffRefused``, the source left alone (the caller may offer it to another worker);
3. prepares the pull on the event loop (peer handle or metadata, read pin, network stream);
4. starts it in the engine (``LLMEngine.start_pull``): from here the engine's KV connector owns
   the transfer, polls it between steps and settles the request;
5. awaits the outcome (``PullReport``: pulled, recomputed or failed) and records metrics and the
   ``pdmesh.kv_transfer`` span.

The source is told exactly once, when the transfer has *stopped* (``EndRead`` for a one-sided
read, else ``Release``), even when ``take`` itself was cancelled (client gone): cancellation
aborts the request in the engine, whose connector stops the transfer first.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Optional

from pdmesh.engine.async_engine import AsyncEngine
from pdmesh.engine.connector import PullJob, PullOutcome, PullReport
from pdmesh.engine.engine import RemoteAdmission, RequestRejected
from pdmesh.engine.sequence import SamplingParams
from pdmesh.rpc import tracecontext
from pdmesh.transport.base import BaseKVTransport, PreparedPull, TransferError
from pdmesh.v1 import common_pb2 as pb

log = logging.getLogger(__name__)

ReleaseFn = Callable[[pb.KVDescriptor, int, Optional[str]], None]
"""(descriptor, read_id or 0, traceparent) -> tells the source it may free the KV (no waiting)."""


class HandoffError(Exception):
    """The request cannot take this KV (bad descriptor, bad request); the source was released."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        """'failed_precondition' or 'invalid_argument'."""


class HandoffRefused(Exception):
    """No room for the prompt's blocks now; the source still holds the KV."""


OUTCOME_SLACK_S = 30.0
"""How much longer than the pull's timeout the hand-off waits for the engine to settle it."""

OUTCOME_PROTO = {PullOutcome.PULLED: pb.TRANSFER_PULLED, PullOutcome.RECOMPUTED: pb.TRANSFER_RECOMPUTED,
                 PullOutcome.FAILED: pb.TRANSFER_FAILED}


@dataclass(frozen=True)
class HandoffResult:
    report: PullReport
    cached_blocks: int
    """Leading blocks found in the local prefix cache (not pulled)."""

    def stats(self) -> pb.TransferStats:
        r = self.report
        return pb.TransferStats(transport=r.transport, bytes=r.bytes, blocks=r.blocks, cached_blocks=self.cached_blocks,
                                seconds=r.seconds, outcome=OUTCOME_PROTO[r.outcome])


def _settle(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


class KVHandoff:
    def __init__(self, engine: AsyncEngine, transports: dict[str, BaseKVTransport], release: ReleaseFn,
                 timeout: float, policy: str = "recompute", tel=None, metrics=None) -> None:
        self.engine = engine
        self.transports = transports
        self.release = release
        self.timeout = timeout
        """Deadline of one pull (seconds)."""
        self.policy = policy
        self.tel = tel
        self.metrics = metrics

    async def take(self, rid: str, prompt: list[int], first_token: int, params: SamplingParams, desc: pb.KVDescriptor,
                   traceparent: Optional[str] = None, span=None) -> HandoffResult:
        transport = self.transports.get(desc.transport)
        if transport is None or desc.num_tokens != len(prompt):
            self.release(desc, 0, traceparent)
            why = f"transport {desc.transport!r} not offered here" if transport is None else "descriptor does not match the prompt"
            raise HandoffError("failed_precondition", why)
        try:
            adm: Optional[RemoteAdmission] = await self.engine.call(lambda e: e.admit_remote(rid, prompt, first_token, params))
        except RequestRejected as exc:
            self.release(desc, 0, traceparent)
            raise HandoffError("invalid_argument", str(exc)) from exc
        if adm is None:
            raise HandoffRefused()
        if len(adm.block_ids) != len(desc.block_ids):
            self.engine.call_nowait(lambda e: e.abort(rid))
            self.release(desc, 0, traceparent)
            raise HandoffError("failed_precondition", "block count differs between prefill and decode")
        if span is not None:
            span.add_event("admitted", {"pdmesh.blocks": len(adm.block_ids), "pdmesh.cached_blocks": adm.num_cached_blocks})
        return await self._pull(rid, desc, transport, adm, traceparent, span)

    async def _pull(self, rid: str, desc: pb.KVDescriptor, transport: BaseKVTransport, adm: RemoteAdmission,
                    tp: Optional[str], span) -> HandoffResult:
        k = adm.num_cached_blocks
        xfer = self.tel.child_span("pdmesh.kv_transfer", span, {"pdmesh.kv.transport": transport.name}) if self.tel else None
        xtp = self.tel.traceparent(xfer, tp) if self.tel else tp
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future = loop.create_future()
        prepared: Optional[PreparedPull] = None
        started = False
        try:
            error = ""
            try:
                prepared = await transport.prepare(desc, list(desc.block_ids)[k:], self.timeout, tracecontext.metadata(xtp))
            except TransferError as exc:
                error = str(exc)
            read_id = prepared.read_id if prepared is not None else 0
            job = PullJob(rid, transport, prepared, k, self.policy, error=error,
                          expect_checksums=list(desc.block_checksums),
                          on_outcome=lambda r: loop.call_soon_threadsafe(_settle, outcome, r),
                          on_stopped=lambda: loop.call_soon_threadsafe(self.release, desc, read_id, xtp))
            started = True
            await self.engine.call(lambda e: e.start_pull(job))
            # The connector settles every pull by its deadline; a longer wait means the engine died.
            report: PullReport = await asyncio.wait_for(outcome, self.timeout + OUTCOME_SLACK_S)
        except BaseException:
            if not started:  # nothing reached the engine: stop what prepare opened, free the source now
                if prepared is not None and prepared.close is not None:
                    prepared.close()
                self.release(desc, prepared.read_id if prepared is not None else 0, xtp)
            self.engine.call_nowait(lambda e: e.abort(rid))  # the connector stops the transfer, then releases
            if xfer is not None:
                xfer.set_attributes({"error.type": "aborted"})
                xfer.end()
            raise
        self._record(rid, report, k, xfer, tp)
        return HandoffResult(report, k)

    def _record(self, rid: str, r: PullReport, k: int, xfer, tp: Optional[str]) -> None:
        m = self.metrics
        if r.outcome is PullOutcome.PULLED:
            if xfer is not None:
                xfer.set_attributes({"pdmesh.kv.bytes": r.bytes, "pdmesh.kv.blocks": r.blocks, "pdmesh.kv.cached_blocks": k,
                                     "pdmesh.kv.seconds": r.seconds, "pdmesh.kv.gbps": r.gbps, "pdmesh.kv.outcome": r.outcome.value})
                if r.device_seconds is not None:
                    xfer.set_attribute("pdmesh.kv.device_seconds", r.device_seconds)
            if m is not None:
                m.inc("kv_transfer_bytes_total", r.bytes, transport=r.transport)
                m.observe("kv_transfer_seconds", r.seconds, transport=r.transport)
            dev = f" (copy {r.device_seconds * 1e3:.2f}ms on the GPU)" if r.device_seconds is not None else ""
            log.info("decode %s trace=%s pulled %d blocks (%d cached locally) %d bytes via %s in %.2fms%s",
                     rid, tracecontext.trace_id(tp), r.blocks, k, r.bytes, r.transport, r.seconds * 1e3, dev)
        else:
            if xfer is not None:
                xfer.set_attributes({"error.type": "aborted" if r.aborted else "transfer_failed",
                                     "pdmesh.kv.outcome": r.outcome.value, "pdmesh.kv.failure_policy": self.policy})
            if m is not None and not r.aborted:
                m.inc("kv_transfer_failures_total", action=self.policy)
            log.warning("request %s: KV pull via %s %s: %s", rid, r.transport, r.outcome.value, r.error)
        if xfer is not None:
            xfer.end()
