"""The public gRPC API (``pdmesh.v1.Inference``), served by the gateway process.

Each call becomes the same request body the HTTP API validates and runs through the same
``Gateway.admit`` / ``launch`` / ``end_request`` path, so sampling fields, validation, the
context-length check, limits, metrics and traces are shared; only the shapes and the status
codes differ.  Cancelling the call cancels the request's choices, which aborts them on decode and
prefill and frees their KV.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

import grpc

from pdmesh.openai.protocol import APIError
from pdmesh.rpc import tracecontext
from pdmesh.rpc.convert import logprob_to_proto
from pdmesh.v1 import inference_pb2 as ipb
from pdmesh.v1 import inference_pb2_grpc as igrpc

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
          503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "min_tokens", "n")


def status_of(err: APIError) -> grpc.StatusCode:
    return _CODES.get(err.status, grpc.StatusCode.INTERNAL)


def sampling_body(s: ipb.SamplingOptions, kind: str) -> dict[str, Any]:
    """SamplingOptions -> the HTTP API's fields (only those set)."""
    body: dict[str, Any] = {f: getattr(s, f) for f in _OPTIONAL if s.HasField(f)}
    for f in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if f in body:
            body[f] = round(body[f], 6)  # proto floats are float32
    if s.stop:
        body["stop"] = list(s.stop)
    if s.include_stop_str_in_output:
        body["include_stop_str_in_output"] = True
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.HasField("logprobs"):
        if kind == "chat":
            body["logprobs"], body["top_logprobs"] = True, s.logprobs
        else:
            body["logprobs"] = s.logprobs
    return body


class InferenceServicer(igrpc.InferenceServicer):
    def __init__(self, gw) -> None:
        self.gw = gw

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        key = self.gw.api_key
        if not key:
            return
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key: send metadata 'authorization: Bearer <key>'")

    async def Generate(self, request: ipb.TextGenerationRequest, context: grpc.aio.ServicerContext):
        which = request.WhichOneof("prompt")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "set prompt: text or token_ids")
        body = {"prompt": request.text if which == "text" else list(request.token_ids.ids)}
        async for msg in self._run(request.model, body, request.sampling, "completion", context):
            yield msg

    async def Chat(self, request: ipb.ChatRequest, context: grpc.aio.ServicerContext):
        body: dict[str, Any] = {"messages": [{"role": m.role, "content": m.content} for m in request.messages]}
        if request.chat_template_kwargs:
            kwargs = {}
            for k, v in request.chat_template_kwargs.items():
                try:
                    kwargs[k] = json.loads(v)
                except json.JSONDecodeError:
                    kwargs[k] = v
            body["chat_template_kwargs"] = kwargs
        async for msg in self._run(request.model, body, request.sampling, "chat", context):
            yield msg

    async def ListModels(self, request: ipb.ListModelsRequest, context: grpc.aio.ServicerContext) -> ipb.ListModelsResponse:
        await self._authorize(context)
        return ipb.ListModelsResponse(models=[ipb.Model(id=self.gw.served_name, max_model_len=self.gw.max_model_len, owned_by="pdmesh")])

    async def _run(self, model: str, body: dict[str, Any], sampling: ipb.SamplingOptions, kind: str,
                   context: grpc.aio.ServicerContext):
        await self._authorize(context)
        gw = self.gw
        if model:
            body["model"] = model
        body.update(sampling_body(sampling, kind))
        gw.metrics.inc("requests_received_total")
        try:
            req, prompts, params = gw.admit(json.dumps(body).encode(), kind)
        except APIError as err:
            await context.abort(status_of(err), gw.rejected(err).message)
        run = gw.launch(req, prompts, params, tracecontext.from_context(context))
        try:
            try:
                await asyncio.gather(*(c.started for c in run.choices))
            except APIError as err:
                await context.abort(status_of(err), err.message)
            remaining = len(run.choices)
            while remaining:
                d = await run.queue.get()
                if d.error is not None:
                    await context.abort(status_of(d.error), d.error.message)
                msg = ipb.InferenceResponse(request_id=run.rid, index=d.index, text=d.content, reasoning_text=d.reasoning,
                                            token_ids=d.token_ids or [], finish_reason=d.finish_reason or "")
                if req.logprobs and d.logprobs:
                    msg.logprobs.extend(logprob_to_proto(lp) for lp in d.logprobs)
                yield msg
                if d.finish_reason is not None:
                    remaining -= 1
            u = gw._usage(run.choices)
            yield ipb.InferenceResponse(request_id=run.rid, usage=ipb.Usage(
                prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"], total_tokens=u["total_tokens"],
                cached_tokens=u["prompt_tokens_details"]["cached_tokens"],
                reasoning_tokens=u["completion_tokens_details"]["reasoning_tokens"]))
        finally:
            await gw._end_request(run.tasks, run.span, req, run.rid, run.choices)


async def start_grpc_api(gw, host: str, port: int):
    """Serve Inference + grpc.health.v1 + reflection; returns (server, health)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection

    from pdmesh.rpc.server import Health, bind, make_server

    server = make_server()
    igrpc.add_InferenceServicer_to_server(InferenceServicer(gw), server)
    health = Health(server, ["pdmesh.v1.Inference"])
    reflection.enable_server_reflection((ipb.DESCRIPTOR.services_by_name["Inference"].full_name,
                                         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    bind(server, host, port, flag="--grpc-port")
    await server.start()
    return server, health
