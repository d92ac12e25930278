"""One request's path through the mesh, as the gateway drives it.

``stream()`` yields ``TokenEvent``s: the first comes from the prefill worker as soon as it has
sampled the first token (TTFT never waits for the KV transfer); the rest stream from the decode
worker, which pulls the KV meanwhile.  A colocated route (a 'both' worker) is one Generate stream
from that worker, first token included.  Failures before any token is produced are retried on other
workers; failures after it end the stream with ``MeshError``.  Closing the generator early
(client gone, stop string) cancels the decode call — which aborts the request there — and, if
decode never took the KV, releases it on prefill.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncGenerator, AsyncIterator, Optional

import grpc

from pdmesh.engine.sequence import SamplingParams, TokenLogprob
from pdmesh.rpc import tracecontext
from pdmesh.rpc.channels import ChannelPool
from pdmesh.routing import can_use
from pdmesh.rpc.convert import logprob_from_proto, params_to_proto
from pdmesh.rpc.release import ACCEPTED_KEY, FINISHED_BY_CALLER, REFUSED_KEY, release_held_kv
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import decode_pb2 as dpb
from pdmesh.v1 import decode_pb2_grpc as dgrpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc
from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc

log = logging.getLogger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
"""Prefill failures tried again on another worker (gone, draining, or full)."""


class MeshError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class TokenEvent:
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]]
    finished: bool
    finish_reason: Optional[str]
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    """On the first event, when asked: logprobs of prompt tokens 1.. (from the worker that computed the prompt)."""


@dataclass
class RequestTrace:
    """What the mesh did for one request (for usage, logs and traces)."""

    prefill_worker: str = ""
    decode_worker: str = ""
    route_reason: str = ""
    num_cached_tokens: int = 0
    transport: str = ""
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    transfer_outcome: int = 0
    """pb.TransferOutcome of the KV pull (pulled, recomputed, failed)."""
    attempts: int = 0
    first_token_time: float = 0.0
    traceparent: str = ""
    """W3C trace context of this request (sent as gRPC metadata on every internal call)."""
    stopped_by_text: bool = False
    """The gateway ended the request itself: a stop string appeared in the text. The worker is told
    so before its stream is cancelled, and counts a finished request, not an aborted one."""


@dataclass
class MeshClient:
    scheduler: str
    route_timeout: float = 5.0
    rpc_timeout: float = 10.0
    channels: ChannelPool = field(default_factory=ChannelPool)
    max_attempts: int = 3
    stream_idle_timeout: float = 10.0
    """Seconds a worker's stream may stay silent (workers send a heartbeat every second while a
    request waits) before the request ends with UNAVAILABLE: the worker is stuck or frozen."""

    def _scheduler(self) -> sgrpc.SchedulerStub:
        return self.channels.stub(self.scheduler, sgrpc.SchedulerStub)

    async def list_workers(self, timeout: float = 2.0) -> spb.ListWorkersResponse:
        return await self._scheduler().ListWorkers(spb.ListWorkersRequest(), timeout=timeout)

    async def _route(self, rid: str, model: str, prompt: list[int], exclude: list[str], deadline: float,
                     trace: RequestTrace) -> spb.RouteResponse:
        try:
            return await self._scheduler().Route(
                spb.RouteRequest(request_id=rid, model=model, prompt_tokens=len(prompt), exclude_worker_ids=exclude,
                                 prompt_token_ids=prompt),
                timeout=min(self.route_timeout, max(0.01, deadline - time.monotonic())),
                metadata=tracecontext.metadata(trace.traceparent))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and "worker" not in (exc.details() or "")
            msg = "the scheduler is unreachable" if unreachable else exc.details()
            raise MeshError(grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.DEADLINE_EXCEEDED else code, msg or code.name) from exc

    async def _start(self, rid: str, model: str, prompt: list[int], params: SamplingParams, deadline: float,
                     trace: RequestTrace) -> tuple[spb.RouteResponse, "ppb.PrefillResponse | _LocalCall"]:
        """Route and get the first token: from a prefill worker (disaggregated) or from the first
        message of a colocated worker's stream.  Refusals before any token are retried elsewhere."""
        exclude: list[str] = []
        last: Optional[MeshError] = None
        for attempt in range(self.max_attempts):
            trace.attempts = attempt + 1
            try:
                route = await self._route(rid, model, prompt, exclude, deadline, trace)
            except MeshError as exc:
                if last is not None:  # no other worker left: the earlier refusal says why
                    raise last from exc
                raise
            trace.prefill_worker, trace.decode_worker, trace.route_reason = route.prefill.worker_id, route.decode.worker_id, route.reason
            try:
                if route.colocated:
                    return route, await self._open_local(route, rid, prompt, params, deadline, trace)
                resp = await self.channels.stub(route.prefill.address, pgrpc.PrefillStub).Prefill(
                    ppb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, params=params_to_proto(params), transport=route.transport),
                    timeout=max(0.01, deadline - time.monotonic()), metadata=tracecontext.metadata(trace.traceparent))
                return route, resp
            except grpc.aio.AioRpcError as exc:
                last = MeshError(exc.code(), exc.details() or exc.code().name)
                if exc.code() not in _RETRYABLE:
                    raise last from exc
                log.info("%s on %s failed (%s); retrying elsewhere", "colocated request" if route.colocated else "prefill",
                         route.prefill.worker_id, exc.code().name)
                exclude.append(route.prefill.worker_id)
        assert last is not None
        raise last

    async def _open_local(self, route: spb.RouteResponse, rid: str, prompt: list[int], params: SamplingParams,
                          deadline: float, trace: RequestTrace) -> "_LocalCall":
        """Start a colocated request and wait for its first message (the first token)."""
        call = self.channels.stub(route.decode.address, dgrpc.DecodeStub).Generate(
            dpb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, params=params_to_proto(params)),
            timeout=max(0.01, deadline - time.monotonic()), metadata=tracecontext.metadata(trace.traceparent))
        messages = call.__aiter__()
        try:
            first = await self._next_message(messages, route.decode.worker_id)
        except StopAsyncIteration:
            call.cancel()
            raise MeshError(grpc.StatusCode.UNAVAILABLE, f"worker {route.decode.worker_id} ended the stream before the first token") from None
        except BaseException:
            call.cancel()
            raise
        return _LocalCall(rid, call, messages, first)

    async def _other_decode(self, rid: str, model: str, prompt: list[int], kv, exclude: list[str], deadline: float,
                            trace: RequestTrace) -> Optional[pb.WorkerInfo]:
        """Another decode worker that can pull ``kv`` (same transport, usable from the source's host), or None."""
        try:
            route = await self._route(rid, model, prompt, exclude, deadline, trace)
        except MeshError:
            return None
        d = route.decode
        if not can_use(kv.transport, d, kv.host_id):
            return None
        return d

    async def stream(self, rid: str, model: str, prompt: list[int], params: SamplingParams, timeout: float,
                     trace: Optional[RequestTrace] = None) -> AsyncGenerator[TokenEvent, None]:
        trace = trace or RequestTrace()
        trace.traceparent = trace.traceparent or tracecontext.new()
        deadline = time.monotonic() + timeout
        route, pre = await self._start(rid, model, prompt, params, deadline, trace)
        if isinstance(pre, _LocalCall):
            async for ev in self._stream_local(pre, route, trace):
                yield ev
            return
        trace.num_cached_tokens = pre.num_cached_tokens
        trace.first_token_time = time.monotonic()
        first_lp = [logprob_from_proto(pre.first_logprob)] if pre.HasField("first_logprob") else None
        done = bool(pre.finish_reason)
        yield TokenEvent([pre.first_token_id], first_lp, done, pre.finish_reason or None,
                         [logprob_from_proto(m) for m in pre.prompt_logprobs] if params.prompt_logprobs is not None else None)
        if done:
            return
        decode, tried = route.decode, []
        call = None
        took_kv = False
        finished = False
        try:
            while True:
                call = self.channels.stub(decode.address, dgrpc.DecodeStub).Generate(
                    dpb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, first_token_id=pre.first_token_id,
                                        params=params_to_proto(params), kv=pre.kv),
                    timeout=max(0.01, deadline - time.monotonic()), metadata=tracecontext.metadata(trace.traceparent))
                try:
                    messages = call.__aiter__()
                    while True:
                        try:
                            msg = await self._next_message(messages, decode.worker_id)
                        except StopAsyncIteration:
                            break
                        if msg.HasField("transfer"):
                            took_kv = True
                            t = msg.transfer
                            trace.transport, trace.transfer_bytes, trace.transfer_seconds = t.transport, t.bytes, t.seconds
                            trace.transfer_outcome = t.outcome
                        if msg.token_ids or msg.finished:
                            finished = msg.finished
                            yield _event(msg)
                        if msg.finished:
                            return
                    raise MeshError(grpc.StatusCode.UNAVAILABLE, f"decode worker {decode.worker_id} ended the stream early")
                except grpc.aio.AioRpcError as exc:
                    refused = not took_kv and _refused(exc)
                    if refused:
                        tried.append(decode.worker_id)
                        nxt = await self._other_decode(rid, model, prompt, pre.kv, tried, deadline, trace) \
                            if len(tried) < self.max_attempts else None
                        if nxt is not None:
                            log.info("decode %s refused %s (%s); trying %s", decode.worker_id, rid, exc.code().name, nxt.worker_id)
                            decode, trace.decode_worker = nxt, nxt.worker_id
                            continue
                    took_kv = took_kv or not refused
                    raise MeshError(exc.code(), f"decode worker {decode.worker_id}: {exc.details() or exc.code().name}") from exc
        finally:
            if call is not None and not finished:
                await self._end_early(decode, rid, trace)
                call.cancel()
            if not took_kv:
                release_held_kv(self.channels, route.prefill.address, rid, trace.traceparent, self.rpc_timeout,
                                lease_token=pre.kv.lease_token)

    async def _next_message(self, messages: AsyncIterator[dpb.GenerateResponse], worker_id: str) -> dpb.GenerateResponse:
        """The worker's next message that carries something (heartbeats skipped); UNAVAILABLE when
        the stream stays silent for ``stream_idle_timeout``. StopAsyncIteration at the stream's end."""
        while True:
            try:
                async with asyncio.timeout(self.stream_idle_timeout):
                    msg = await messages.__anext__()
            except TimeoutError:
                raise MeshError(grpc.StatusCode.UNAVAILABLE, f"worker {worker_id} sent nothing for "
                                f"{self.stream_idle_timeout:.0f}s: it is stuck or frozen") from None
            if msg.token_ids or msg.finished or msg.HasField("transfer"):
                return msg

    async def _end_early(self, worker: pb.WorkerInfo, rid: str, trace: RequestTrace) -> None:
        """Before cancelling a stream the gateway ends by a stop string, say so (the worker then counts
        the request as finished); a client gone needs no word: the cancellation is the abort."""
        if not trace.stopped_by_text:
            return
        try:
            await self.channels.stub(worker.address, dgrpc.DecodeStub).Abort(
                pb.AbortRequest(request_id=rid, reason=FINISHED_BY_CALLER), timeout=self.rpc_timeout,
                metadata=tracecontext.metadata(trace.traceparent))
        except grpc.aio.AioRpcError as exc:
            log.info("telling %s that %s ended by a stop string failed (%s)", worker.worker_id, rid, exc.code().name)

    async def _stream_local(self, local: "_LocalCall", route: spb.RouteResponse, trace: RequestTrace) -> AsyncIterator[TokenEvent]:
        """The rest of a colocated request: every message of the worker's stream, first included."""
        trace.num_cached_tokens = local.first.num_cached_tokens
        trace.first_token_time = time.monotonic()
        finished = False
        try:
            msg = local.first
            while True:
                if msg.token_ids or msg.finished:
                    finished = msg.finished
                    yield _event(msg)
                if finished:
                    return
                try:
                    msg = await self._next_message(local.messages, route.decode.worker_id)
                except StopAsyncIteration:
                    raise MeshError(grpc.StatusCode.UNAVAILABLE, f"worker {route.decode.worker_id} ended the stream early") from None
                except grpc.aio.AioRpcError as exc:
                    raise MeshError(exc.code(), f"worker {route.decode.worker_id}: {exc.details() or exc.code().name}") from exc
        finally:
            if not finished:
                await self._end_early(route.decode, local.rid, trace)
                local.call.cancel()  # aborts the request there and frees its KV


@dataclass
class _LocalCall:
    """A colocated worker's Generate stream, opened, with its first message read."""

    rid: str
    call: grpc.aio.UnaryStreamCall
    messages: AsyncIterator[dpb.GenerateResponse]
    first: dpb.GenerateResponse


def _event(msg: dpb.GenerateResponse) -> TokenEvent:
    """The tokens (and logprobs, finish) of one Generate message."""
    lps = [logprob_from_proto(m) for m in msg.logprobs] if msg.logprobs else None
    plps = [logprob_from_proto(m) for m in msg.prompt_logprobs] if msg.prompt_logprobs else None
    return TokenEvent(list(msg.token_ids), lps, msg.finished, msg.finish_reason or None, plps)


def _refused(exc: grpc.aio.AioRpcError) -> bool:
    """The decode worker turned the request away before touching its KV (draining, full), or the
    call never reached its handler (UNAVAILABLE before the worker said it accepted: it had stopped
    listening after the route was handed out): the prefill worker still holds the KV, so another
    decode worker may take it."""
    if any(k == REFUSED_KEY for k, _ in (exc.trailing_metadata() or ())):
        return True
    return exc.code() == grpc.StatusCode.UNAVAILABLE and not any(k == ACCEPTED_KEY for k, _ in (exc.initial_metadata() or ()))
