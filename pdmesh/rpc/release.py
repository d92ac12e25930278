"""Telling a prefill worker to free a request's held KV, without waiting (lease expiry is the
backstop when the call fails). Used by the decode worker when a pull has stopped (``EndRead`` for
a one-sided read, which also ends its pin; else ``Release``) or after a refusal, and by the
gateway when decode never took the KV."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import grpc

from pdmesh.rpc import tracecontext
from pdmesh.rpc.channels import ChannelPool
from pdmesh.v1 import kv_transfer_pb2 as kpb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc

log = logging.getLogger(__name__)

REFUSED_KEY = "pdmesh-refused"
"""Trailing metadata of a decode worker's refusal that left the request's KV untouched on the
prefill worker (draining, too many requests, no free blocks): the caller may offer the same KV
to another decode worker, and releases it if none takes it."""
ACCEPTED_KEY = "pdmesh-accepted"
"""Initial metadata a decode worker sends once it has taken a disaggregated request on (before
it touches the KV). A call that fails UNAVAILABLE without it never reached the worker's handler (the
worker had stopped listening after a route to it was handed out): the KV is untouched, so the
caller may offer it to another decode worker, as after a refusal."""
FINISHED_BY_CALLER = "finished"
"""``AbortRequest.reason`` when the caller ended a request that is done by the caller's own rule (a
stop string found in the text): the worker counts it as finished with reason 'stop', not aborted."""
_pending: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones


def release_held_kv(channels: ChannelPool, address: str, request_id: str, traceparent: Optional[str],
                    timeout: float, *, read_id: int = 0, lease_token: str = "") -> None:
    """``lease_token``: the descriptor's (prefill refuses a release or an EndRead without it)."""
    async def go() -> None:
        md = tracecontext.metadata(traceparent)
        try:
            if read_id:
                await channels.stub(address, kgrpc.KVTransferStub).EndRead(
                    kpb.EndReadRequest(request_id=request_id, read_id=read_id, lease_token=lease_token), timeout=timeout,
                    metadata=md)
            else:
                await channels.stub(address, pgrpc.PrefillStub).Release(
                    ppb.ReleaseRequest(request_id=request_id, lease_token=lease_token), timeout=timeout, metadata=md)
        except grpc.aio.AioRpcError as exc:
            log.info("release of %s on %s failed (%s); its lease will expire", request_id, address, exc.code().name)

    task = asyncio.ensure_future(go())
    _pending.add(task)
    task.add_done_callback(_pending.discard)
