"""Prefill worker.

Lifecycle of a request here
---------------------------
``Prefill`` -> the engine computes the prompt (chunked, batched with others) and samples the
first token -> if the request ended there (EOS, stop id, max_tokens=1) its KV is freed at once and
``finish_reason`` is returned; otherwise its blocks stay held under a lease (``LeaseTable``) and a
``KVDescriptor`` goes back -> the decode worker pulls them (``KVTransfer.Pull``, or a one-sided
read between ``BeginRead`` and ``EndRead``; both pin and extend the lease) -> ``EndRead`` /
``Release`` (or ``Abort``, or lease expiry, at the latest ``--kv-lease-max-seconds``) frees them; a
release during a read takes effect when the read ends.  A cancelled ``Prefill`` call
aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdmesh.engine.async_engine import RequestAborted
from pdmesh.engine.engine import RequestRejected
from pdmesh.rpc import tracecontext
from pdmesh.rpc.authz import caller
from pdmesh.rpc.convert import layout_to_proto, logprob_to_proto, params_from_proto
from pdmesh.transport.capability import authorize_release, prompt_hash
from pdmesh.transport.faults import FaultPlan
from pdmesh.transport.lease import LeaseTable
from pdmesh.transport.servicer import KVTransferServicer
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc
from pdmesh.worker import WorkerRuntime

log = logging.getLogger(__name__)


class PrefillServicer(pgrpc.PrefillServicer):
    def __init__(self, rt: WorkerRuntime, leases: LeaseTable) -> None:
        self.rt = rt
        self.leases = leases

    async def Prefill(self, request: ppb.PrefillRequest, context: grpc.aio.ServicerContext) -> ppb.PrefillResponse:
        await self.rt.refuse_if_unable(context)
        rid = request.request_id
        if not self.rt.owners.claim(rid, caller()):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is in use on {self.rt.worker_id}")
        try:
            return await self._prefill(request, context, rid)
        finally:
            if self.leases.get(rid) is None:  # no KV held: the request is over here
                self.rt.owners.drop(rid)

    async def _prefill(self, request: ppb.PrefillRequest, context: grpc.aio.ServicerContext, rid: str) -> ppb.PrefillResponse:
        try:
            params = params_from_proto(request.params)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        prompt = list(request.prompt_token_ids)
        self.rt.inflight += 1
        self.rt.requests_total += 1
        t0 = time.monotonic()
        tel = self.rt.tel
        span = tel.start("pdmesh.prefill", tracecontext.from_context(context), attributes={
            "pdmesh.request_id": rid, "pdmesh.worker_id": self.rt.worker_id, "gen_ai.usage.input_tokens": len(prompt)})
        assert self.rt.metrics is not None  # made by WorkerRuntime.run before the servicers
        try:
            out = None
            try:
                async for out in self.rt.engine.generate(rid, prompt, params, prefill_only=True):  # noqa: B007 - the last output is kept
                    pass
            except asyncio.CancelledError:
                self.rt.metrics.inc("num_aborted_requests_total")  # the caller went away: aborted
                raise
            except RequestRejected as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except RequestAborted as exc:
                await context.abort(grpc.StatusCode.ABORTED, str(exc))
            assert out is not None
            resp = ppb.PrefillResponse(
                first_token_id=out.new_token_ids[0], finish_reason=out.finish_reason or "",
                num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
                queue_seconds=out.queue_time, compute_seconds=max(0.0, time.monotonic() - t0 - out.queue_time),
            )
            if out.logprobs:
                resp.first_logprob.CopyFrom(logprob_to_proto(out.logprobs[0]))
            if out.prompt_logprobs:
                resp.prompt_logprobs.extend(logprob_to_proto(lp) for lp in out.prompt_logprobs)
            log.info("prefill %s trace=%s prompt=%d cached=%d queue=%.1fms compute=%.1fms held_blocks=%d",
                     rid, tracecontext.trace_id(tracecontext.from_context(context)), out.num_prompt_tokens,
                     out.num_cached_tokens, resp.queue_seconds * 1e3, resp.compute_seconds * 1e3,
                     len(out.held_block_ids or ()))
            span.set_attributes({"pdmesh.prefill.queue_seconds": resp.queue_seconds,
                                 "pdmesh.prefill.compute_seconds": resp.compute_seconds,
                                 "pdmesh.prefill.cached_tokens": out.num_cached_tokens,
                                 "pdmesh.prefill.held_blocks": len(out.held_block_ids or ())})
            tel.token_event(span, 0, **{"gen_ai.token.id": out.new_token_ids[0]})
            if out.finish_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [out.finish_reason])
                self.rt.metrics.inc("request_success_total", finished_reason=out.finish_reason)
            if out.held_block_ids is not None:
                lease = self.leases.add(rid, out.held_block_ids, len(prompt), out.held_block_checksums, prompt_hash(prompt))
                llm = self.rt.llm
                resp.kv.CopyFrom(pb.KVDescriptor(
                    request_id=rid, worker_id=self.rt.worker_id, address=self.rt.address,
                    transport=request.transport or "grpc", block_ids=out.held_block_ids, num_tokens=len(prompt),
                    layout=layout_to_proto(llm.pool.layout),
                    lease_deadline_unix_ms=int((time.time() + (lease.deadline - time.monotonic())) * 1000),
                    host_id=self.rt.host_id, incarnation=self.rt.incarnation, block_checksums=lease.checksums,
                    lease_token=lease.token, prompt_hash=lease.prompt_hash,
                ))
            return resp
        finally:
            span.end()
            self.rt.inflight -= 1

    async def Release(self, request: ppb.ReleaseRequest, context: grpc.aio.ServicerContext) -> ppb.ReleaseResponse:
        lease = self.leases.get(request.request_id)
        if lease is None:
            return ppb.ReleaseResponse(found=False)
        owner = self.rt.owners.owner(request.request_id)
        refused = authorize_release(lease, request.lease_token, str(caller()), str(owner) if owner else None)
        if refused:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"release of {request.request_id!r}: {refused}")
        return ppb.ReleaseResponse(found=self.leases.release(request.request_id))

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        rid = request.request_id
        assert self.rt.metrics is not None  # made by WorkerRuntime.run before the servicers
        await self._only_owner(rid, context)
        self.rt.metrics.inc("num_aborted_requests_total")
        found = self.leases.release(rid)
        found_engine = await self.rt.engine.abort(rid) if not found else False
        return pb.AbortResponse(found=found or found_engine)


    async def _only_owner(self, rid: str, context: grpc.aio.ServicerContext) -> None:
        """PERMISSION_DENIED unless the caller started ``rid``."""
        owner = self.rt.owners.owner(rid)
        if owner is not None and owner != caller():
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"request {rid!r} belongs to another caller")


def add_servicers(rt: WorkerRuntime, leases: LeaseTable) -> list[str]:
    pgrpc.add_PrefillServicer_to_server(PrefillServicer(rt, leases), rt.server)
    faults = FaultPlan.parse(rt.wcfg.inject_kv_faults)
    if faults.mode:
        log.warning("injecting KV transfer faults: %s", rt.wcfg.inject_kv_faults)
    nixl = rt.nixl_agent
    kgrpc.add_KVTransferServicer_to_server(KVTransferServicer(rt.llm.pool, leases, rt.incarnation, faults, rt.metrics, nixl),
                                           rt.server)
    return ["pdmesh.v1.Prefill", "pdmesh.v1.KVTransfer"]


async def serve(rt: WorkerRuntime) -> None:
    def free(rid: str) -> None:  # a lease ended: the blocks go back, and the request id with them
        rt.owners.drop(rid)
        rt.engine.call_nowait(lambda e: e.release(rid))

    leases = LeaseTable(free, rt.wcfg.kv_lease_seconds, rt.wcfg.kv_lease_max_seconds)
    await rt.run(lambda r: add_servicers(r, leases), lambda r: [leases.reap_forever()])
