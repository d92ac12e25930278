"""Decode worker.

Lifecycle of a request here
---------------------------
``Generate(request, kv descriptor)`` -> the KV hand-off (``pdmesh.transport.handoff``): allocate
local blocks for the prompt (prefix-cache hits are not pulled), prepare the pull over the
descriptor's transport, and hand it to the engine, whose KV connector runs it between steps and
settles the request: pulled (queued from its first token), recomputed, or failed -> stream tokens
(a step's tokens per message; steps that finished while the client was busy are coalesced) ->
finish.  Every exit path frees the local blocks — blocks a stopped transfer may still write only
once it has stopped.  A refusal before the KV is touched (draining, too many requests, no free
blocks) carries the ``pdmesh-refused`` trailer and leaves the KV held on prefill: the gateway
offers it to another decode worker or releases it at once.  Otherwise prefill is told to release
(``EndRead`` or ``Release``) once the transfer has stopped.  A failed or timed-out pull, per
``--kv-load-failure-policy``, either computes the prompt here ('recompute': the client sees
nothing but a later second token) or fails (UNAVAILABLE).  This servicer only translates RPCs.

Colocated (``pdmesh both``, ROLE_BOTH): ``Generate`` without a descriptor -> the request joins
this engine's continuous batch from its prompt (chunked prefill mixed with others' decode steps)
-> the stream starts with the first token -> same streaming and exit paths, nothing to release.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import grpc

from pdmesh.engine.async_engine import RequestAborted
from pdmesh.engine.connector import PullOutcome
from pdmesh.engine.engine import RequestRejected
from pdmesh.rpc import tracecontext
from pdmesh.rpc.authz import caller
from pdmesh.rpc.peers import PeerDirectory
from pdmesh.rpc.streams import STREAM_HEARTBEAT_S, with_heartbeats
from pdmesh.rpc.release import ACCEPTED_KEY, FINISHED_BY_CALLER, REFUSED_KEY, release_held_kv
from pdmesh.rpc.convert import logprob_to_proto, params_from_proto
from pdmesh.transport.base import BaseKVTransport
from pdmesh.transport.capability import check_descriptor
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.grpc_transport import GrpcKVTransport
from pdmesh.transport.handoff import HandoffError, HandoffRefused, KVHandoff
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import decode_pb2 as dpb
from pdmesh.v1 import decode_pb2_grpc as dgrpc
from pdmesh.worker import WorkerRuntime

log = logging.getLogger(__name__)
REFUSED = ((REFUSED_KEY, "1"),)


@dataclass
class _StreamState:
    generated: int
    """Tokens of this request produced so far (the next token's index)."""
    finished: bool = False
    streamed_any: bool = False
    """Whether this worker has streamed a token of the request yet."""


class DecodeServicer(dgrpc.DecodeServicer):
    def __init__(self, rt: WorkerRuntime, handoff: Optional[KVHandoff], peers: Optional[PeerDirectory] = None) -> None:
        self.rt = rt
        self.peers = peers
        """The prefill workers the scheduler lists: the only ones a descriptor may make us dial."""
        self._finished_by_caller: set[str] = set()
        """Live requests whose caller said they are done (a stop string): their cancelled streams
        count as finished, not aborted."""
        self.handoff = handoff
        """None on a colocated worker (nothing to pull)."""

    def _release_prefill(self, desc: pb.KVDescriptor) -> None:
        release_held_kv(self.rt.channels, desc.address, desc.request_id, None, self.rt.wcfg.rpc_timeout,
                        lease_token=desc.lease_token)

    async def Generate(self, request: dpb.GenerateRequest, context: grpc.aio.ServicerContext):
        colocated = not request.HasField("kv")
        if colocated and self.rt.role != pb.ROLE_BOTH:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"decode worker {self.rt.worker_id} needs the prompt's KV descriptor (only 'both' workers compute prompts)")
        await self.rt.refuse_if_unable(context, () if colocated else REFUSED)
        rid = request.request_id
        if not self.rt.owners.claim(rid, caller()):  # never replace a live request's stream
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is in use on {self.rt.worker_id}", REFUSED)
        if not colocated:
            await context.send_initial_metadata(((ACCEPTED_KEY, "1"),))
        tp = tracecontext.from_context(context)
        try:
            params = params_from_proto(request.params)
        except ValueError as exc:
            self.rt.owners.drop(rid)
            if not colocated:
                self._release_prefill(request.kv)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        eng = self.rt.engine
        self.rt.inflight += 1
        self.rt.requests_total += 1
        q = eng.open_stream(rid)
        state = _StreamState(generated=0 if colocated else 1)  # disaggregated: token 0 came from prefill
        span = self.rt.tel.start("pdmesh.colocated" if colocated else "pdmesh.decode", tp, attributes={
            "pdmesh.request_id": rid, "pdmesh.worker_id": self.rt.worker_id,
            "pdmesh.prefill_worker": self.rt.worker_id if colocated else request.kv.worker_id})
        try:
            if colocated:
                await self._compute_prompt(request, context, rid, params)
            else:  # the pull may take a while: the stream stays audibly alive meanwhile
                async for msg in with_heartbeats(self._take_kv(request, context, rid, params, span, tp), dpb.GenerateResponse):
                    yield msg
            async for msg in self._token_messages(rid, q, span, state):
                yield msg
        except RequestAborted as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        finally:
            span.end()
            eng.close_stream(rid)
            self.rt.owners.drop(rid)
            if not state.finished:
                eng.call_nowait(lambda e: e.abort(rid))
                assert self.rt.metrics is not None  # made by WorkerRuntime.run before the servicers
                if rid in self._finished_by_caller:
                    self.rt.metrics.inc("request_success_total", finished_reason="stop")
                else:
                    self.rt.metrics.inc("num_aborted_requests_total")
            self._finished_by_caller.discard(rid)
            self.rt.inflight -= 1

    async def _compute_prompt(self, request: dpb.GenerateRequest, context: grpc.aio.ServicerContext, rid: str, params):
        """Colocated: queue the whole request here; its stream starts with the first token."""
        prompt = list(request.prompt_token_ids)
        try:
            await self.rt.engine.prepare(params)
            await self.rt.engine.call(lambda e: e.add_request(rid, prompt, params))
        except RequestRejected as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _take_kv(self, request: dpb.GenerateRequest, context: grpc.aio.ServicerContext, rid: str, params, span,
                       tp: Optional[str]):
        """Disaggregated: the KV hand-off (``KVHandoff``: admit, pull in the engine, settle),
        translated into RPC outcomes; yields the transfer stats message.  The descriptor is checked
        first: its prompt hash must be the prompt's (before anything is cached), and it must name a
        prefill worker the scheduler lists (before anything is dialled); otherwise nothing is
        dialled and nothing released."""
        desc = request.kv
        untrusted = check_descriptor(desc.num_tokens, desc.prompt_hash, request.prompt_token_ids)
        if untrusted is None and self.peers is not None and not await self.peers.admits(desc.worker_id, desc.address):
            untrusted = f"it names {desc.worker_id!r} at {desc.address!r}, not a prefill worker the scheduler lists"
        if untrusted is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"KV descriptor refused: {untrusted}")
        try:
            await self.rt.engine.prepare(params)  # a grammar is compiled before the KV is touched
        except RequestRejected as exc:
            self._release_prefill(request.kv)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.handoff is None:  # a colocated worker: it computes prompts, it pulls no KV
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"worker {self.rt.worker_id} is colocated: it takes no KV descriptor")
            return
        try:
            res = await self.handoff.take(rid, list(request.prompt_token_ids), request.first_token_id, params,
                                          request.kv, tp, span)
        except HandoffRefused:  # the caller may offer the KV to another decode worker, else releases it
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode worker {self.rt.worker_id} has no free KV blocks",
                                REFUSED)
        except HandoffError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT if exc.code == "invalid_argument" else grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(code, str(exc))
        r = res.report
        if r.aborted:
            await context.abort(grpc.StatusCode.CANCELLED, "request was aborted during the KV transfer")
        if r.outcome is PullOutcome.FAILED:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {r.error}")
        yield dpb.GenerateResponse(transfer=res.stats())

    async def _token_messages(self, rid: str, q, span, state: "_StreamState"):
        """One message per batch of engine outputs (steps that finished while the consumer was busy
        travel together) until the request finishes."""
        tel = self.rt.tel
        async for batch in self.rt.engine.iterate_batches(rid, q, STREAM_HEARTBEAT_S):
            msg = dpb.GenerateResponse()  # empty when nothing happened for a while: the stream's heartbeat
            for out in batch:
                if state.generated == 0:
                    msg.num_cached_tokens = out.num_cached_tokens
                if out.prompt_logprobs:
                    msg.prompt_logprobs.extend(logprob_to_proto(lp) for lp in out.prompt_logprobs)
                for t in out.new_token_ids:
                    if not state.streamed_any:
                        span.add_event("first_token")
                        state.streamed_any = True
                    tel.token_event(span, state.generated, **{"gen_ai.token.id": t})
                    state.generated += 1
                msg.token_ids.extend(out.new_token_ids)
                if out.logprobs:
                    msg.logprobs.extend(logprob_to_proto(lp) for lp in out.logprobs)
                if out.finished:
                    msg.finished = True
                    msg.finish_reason = out.finish_reason or ""
            state.finished = msg.finished
            if state.finished:
                span.set_attributes({"gen_ai.response.finish_reasons": [msg.finish_reason or "stop"],
                                     "gen_ai.usage.output_tokens": state.generated})
                assert self.rt.metrics is not None  # made by WorkerRuntime.run before the servicers
                self.rt.metrics.inc("request_success_total", finished_reason=msg.finish_reason or "stop")
            yield msg

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if not self.rt.owners.may_control(request.request_id, caller()):
            if self.rt.owners.owner(request.request_id) is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"request {request.request_id!r} belongs to another caller")
            return pb.AbortResponse(found=False)
        found = await self.rt.engine.abort(request.request_id)
        if found and request.reason == FINISHED_BY_CALLER:
            self._finished_by_caller.add(request.request_id)
        return pb.AbortResponse(found=found)


def make_transports(rt: WorkerRuntime) -> dict[str, BaseKVTransport]:
    """The KV transports this decode worker offers, built once."""
    faults = FaultPlan.parse(rt.wcfg.inject_kv_faults)
    if faults.mode:
        log.warning("injecting KV transfer faults into pulls: %s", rt.wcfg.inject_kv_faults)
    out: dict[str, BaseKVTransport] = {}
    if "grpc" in rt.transports:
        out["grpc"] = GrpcKVTransport(rt.channels, faults)
    if "cuda_ipc" in rt.transports:
        from pdmesh.transport.cuda_ipc import CudaIpcTransport

        out["cuda_ipc"] = CudaIpcTransport(rt.channels, rt.llm.device, faults)
    if "nixl" in rt.transports:
        from pdmesh.transport.nixl import NixlKVTransport

        out["nixl"] = NixlKVTransport(rt.channels, rt.nixl_agent, faults, rt.metrics)
    return out


def make_handoff(rt: WorkerRuntime) -> KVHandoff:
    w = rt.wcfg
    return KVHandoff(rt.engine, make_transports(rt),
                     lambda desc, read_id, tp: release_held_kv(rt.channels, desc.address, desc.request_id, tp,
                                                               w.rpc_timeout, read_id=read_id,
                                                               lease_token=desc.lease_token),
                     w.kv_transfer_timeout, w.kv_load_failure_policy, rt.tel, rt.metrics)


async def serve(rt: WorkerRuntime) -> None:
    peers = PeerDirectory(rt.wcfg.scheduler, rt.channels, remember_s=rt.wcfg.kv_lease_max_seconds)

    def add(r: WorkerRuntime) -> list[str]:
        dgrpc.add_DecodeServicer_to_server(DecodeServicer(r, make_handoff(r), peers), r.server)
        return ["pdmesh.v1.Decode"]

    await rt.run(add, lambda r: [peers.run()])


async def serve_colocated(rt: WorkerRuntime) -> None:
    """A ROLE_BOTH worker: Decode.Generate without KV descriptors (the prompt is computed here)."""

    def add(r: WorkerRuntime) -> list[str]:
        dgrpc.add_DecodeServicer_to_server(DecodeServicer(r, None), r.server)
        return ["pdmesh.v1.Decode"]

    await rt.run(add)
