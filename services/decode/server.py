"""Decode worker.

Lifecycle of a request here
---------------------------
``Generate(request, kv descriptor)`` -> allocate local blocks for the prompt (prefix-cache hits
are not pulled) -> pull the rest from the prefill worker over the descriptor's transport -> tell
prefill to ``Release`` -> queue the request in the continuous batch from its first token ->
stream tokens (a step's tokens per message; steps that finished while the client was busy are
coalesced) -> finish.  Every exit path frees the local blocks.  A refusal before the KV is touched
(draining, too many requests, no free blocks) carries the ``pdmesh-refused`` trailer and leaves
the KV held on prefill: the gateway offers it to another decode worker or releases it at once.
Any other failure releases it here.  A failed or timed-out pull frees
the blocks it was filling and, per ``--kv-load-failure-policy``, either computes the prompt here
('recompute': the client sees nothing but a later second token) or fails (UNAVAILABLE); prefill
is told to release in both cases.

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
from pdmesh.engine.engine import RequestRejected
from pdmesh.rpc.authz import caller
from pdmesh.rpc.channels import ChannelPool
from pdmesh.rpc import tracecontext
from pdmesh.rpc.streams import STREAM_HEARTBEAT_S, with_heartbeats
from pdmesh.rpc.release import FINISHED_BY_CALLER, REFUSED_KEY, release_held_kv
from pdmesh.rpc.convert import logprob_to_proto, params_from_proto
from pdmesh.rpc.peers import PeerDirectory
from pdmesh.transport.base import BaseKVTransport, TransferError
from pdmesh.transport.capability import check_descriptor
from pdmesh.transport.grpc_transport import GrpcKVTransport
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
    def __init__(self, rt: WorkerRuntime, transports: dict[str, BaseKVTransport], channels: ChannelPool,
                 peers: Optional[PeerDirectory] = None) -> None:
        self.rt = rt
        self.peers = peers
        """The prefill workers the scheduler lists: the only ones a descriptor may make us dial."""
        self._finished_by_caller: set[str] = set()
        """Live requests whose caller said they are done (a stop string): their cancelled streams
        count as finished, not aborted."""
        self.transports = transports
        self.channels = channels

    def _release_prefill(self, desc: pb.KVDescriptor, tp: Optional[str] = None) -> None:
        release_held_kv(self.channels, desc.address, desc.request_id, tp, self.rt.wcfg.rpc_timeout, desc.lease_token)

    async def Generate(self, request: dpb.GenerateRequest, context: grpc.aio.ServicerContext):
        colocated = not request.HasField("kv")
        if colocated and self.rt.role != pb.ROLE_BOTH:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"decode worker {self.rt.worker_id} needs the prompt's KV descriptor (only 'both' workers compute prompts)")
        await self.rt.refuse_if_unable(context, () if colocated else REFUSED)
        rid = request.request_id
        if not self.rt.owners.claim(rid, caller()):  # never replace a live request's stream
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is in use on {self.rt.worker_id}", REFUSED)
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
            await self.rt.engine.call(lambda e: e.add_request(rid, prompt, params))
        except RequestRejected as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _take_kv(self, request: dpb.GenerateRequest, context: grpc.aio.ServicerContext, rid: str, params, span,
                       tp: Optional[str]):
        """Disaggregated: admit the prompt, pull its KV from prefill, release it there, queue the
        request from its first token; yields the transfer stats message."""
        desc, eng = request.kv, self.rt.engine
        prompt = list(request.prompt_token_ids)
        untrusted = check_descriptor(desc.num_tokens, desc.prompt_hash, prompt)  # before anything is cached
        if untrusted is None and self.peers is not None and not await self.peers.admits(desc.worker_id, desc.address):
            untrusted = f"it names {desc.worker_id!r} at {desc.address!r}, not a prefill worker the scheduler lists"
        if untrusted is not None:  # nothing dialled, nothing released: the descriptor is not to be trusted
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"KV descriptor refused: {untrusted}")
        transport: Optional[BaseKVTransport] = self.transports.get(desc.transport)
        if transport is None or desc.num_tokens != len(prompt):
            self._release_prefill(desc)
            why = f"transport {desc.transport!r} not offered here" if transport is None else "descriptor does not match the prompt"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
        try:
            adm = await eng.call(lambda e: e.admit_remote(rid, prompt, request.first_token_id, params))
        except RequestRejected as exc:
            self._release_prefill(desc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if adm is None:  # the caller may offer the KV to another decode worker, else releases it
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode worker {self.rt.worker_id} has no free KV blocks",
                                REFUSED)
        if len(adm.block_ids) != len(desc.block_ids):
            self._release_prefill(desc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "block count differs between prefill and decode")
        span.add_event("admitted", {"pdmesh.blocks": len(adm.block_ids), "pdmesh.cached_blocks": adm.num_cached_blocks})
        failure: Optional[TransferError] = None
        try:
            stats = await self._pull(rid, desc, transport, adm, span, tp)
        except TransferError as exc:
            failure = exc
        self._release_prefill(desc, tp)
        if failure is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {failure}")
        if stats.transport == "recompute":
            activated = await eng.call(lambda e: e.recompute_remote(rid))
        else:
            activated = await eng.call(lambda e: e.activate_remote(rid))
        if not activated:
            await context.abort(grpc.StatusCode.CANCELLED, "request was aborted during the KV transfer")
        yield dpb.GenerateResponse(transfer=stats)

    async def _token_messages(self, rid: str, q, span, state: "_StreamState"):
        """One message per batch of engine outputs (steps that finished while the consumer was busy
        travel together) until the request finishes."""
        tel = self.rt.tel
        async for batch in self.rt.engine.iterate_batches(rid, q, STREAM_HEARTBEAT_S):
            msg = dpb.GenerateResponse()  # empty when nothing happened for a while: the stream's heartbeat
            for out in batch:
                if state.generated == 0:
                    msg.num_cached_tokens = out.num_cached_tokens
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
                self.rt.metrics.inc("request_success_total", finished_reason=msg.finish_reason or "stop")
            yield msg

    async def _pull(self, rid: str, desc: pb.KVDescriptor, transport: BaseKVTransport, adm, span, tp: Optional[str]
                    ) -> pb.TransferStats:
        """Pull the prompt's blocks (beyond local prefix-cache hits) into ``adm.block_ids``.  A failed
        pull raises ``TransferError`` under ``--kv-load-failure-policy fail``; under 'recompute' it
        returns stats with transport 'recompute' and the request computes its prompt here."""
        tel, k, m = self.rt.tel, adm.num_cached_blocks, self.rt.metrics
        xfer = tel.child_span("pdmesh.kv_transfer", span, {"pdmesh.kv.transport": transport.name})
        xtp = tel.traceparent(xfer, tp)
        try:
            res = await transport.pull(desc, list(desc.block_ids)[k:], adm.block_ids[k:], self.rt.llm.pool,
                                       self.rt.wcfg.kv_transfer_timeout, tracecontext.metadata(xtp))
        except TransferError as exc:
            policy = self.rt.wcfg.kv_load_failure_policy
            xfer.set_attributes({"error.type": "transfer_failed", "pdmesh.kv.failure_policy": policy})
            xfer.end()
            m.inc("kv_transfer_failures_total", action=policy)
            log.warning("request %s: %s (policy: %s)", rid, exc, policy)
            if policy == "fail":
                raise
            return pb.TransferStats(transport="recompute", cached_blocks=k)
        xfer.set_attributes({"pdmesh.kv.bytes": res.bytes, "pdmesh.kv.blocks": res.blocks, "pdmesh.kv.cached_blocks": k,
                             "pdmesh.kv.seconds": res.seconds, "pdmesh.kv.gbps": res.gbps})
        xfer.end()
        m.inc("kv_transfer_bytes_total", res.bytes, transport=res.transport)
        m.observe("kv_transfer_seconds", res.seconds, transport=res.transport)
        log.info("decode %s trace=%s pulled %d blocks (%d cached locally) %d bytes via %s in %.2fms",
                 rid, tracecontext.trace_id(tp), res.blocks, k, res.bytes, res.transport, res.seconds * 1e3)
        return pb.TransferStats(transport=res.transport, bytes=res.bytes, blocks=res.blocks, cached_blocks=k, seconds=res.seconds)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if not self.rt.owners.may_control(request.request_id, caller()):
            if self.rt.owners.owner(request.request_id) is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"request {request.request_id!r} belongs to another caller")
            return pb.AbortResponse(found=False)
        found = await self.rt.engine.abort(request.request_id)
        if found and request.reason == FINISHED_BY_CALLER:
            self._finished_by_caller.add(request.request_id)
        return pb.AbortResponse(found=found)


async def serve(rt: WorkerRuntime) -> None:
    channels = rt.channels
    transports: dict[str, BaseKVTransport] = {}

    def add(r: WorkerRuntime) -> list[str]:
        if "grpc" in r.transports:
            transports["grpc"] = GrpcKVTransport(channels)
        if "cuda_ipc" in r.transports:
            from pdmesh.transport.cuda_ipc import CudaIpcTransport

            transports["cuda_ipc"] = CudaIpcTransport(channels, r.llm.device)
        dgrpc.add_DecodeServicer_to_server(DecodeServicer(r, transports, channels, peers), r.server)
        return ["pdmesh.v1.Decode"]

    peers = PeerDirectory(rt.wcfg.scheduler, channels)
    await rt.run(add, lambda r: [peers.run()])


async def serve_colocated(rt: WorkerRuntime) -> None:
    """A ROLE_BOTH worker: Decode.Generate without KV descriptors (the prompt is computed here)."""

    def add(r: WorkerRuntime) -> list[str]:
        dgrpc.add_DecodeServicer_to_server(DecodeServicer(r, {}, r.channels), r.server)
        return ["pdmesh.v1.Decode"]

    await rt.run(add)
