"""The public gRPC API (``pdmesh.v1.Inference``), served by the gateway process.

Each call becomes the request body the HTTP API takes (a dict in OpenAI's shape) and runs through
the same ``Gateway.admit`` / ``launch`` / ``end`` path, so fields, validation, the context-length
check, limits, API keys, metrics and traces are shared; only the shapes and the status codes
differ.  Cancelling the call cancels the request's choices, which aborts them on decode and
prefill and frees their KV.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Optional

import grpc

from pdmesh.openai.auth import authorize
from pdmesh.openai.errors import APIError
from pdmesh.openai.responses import finish_reason
from pdmesh.rpc import tracecontext
from pdmesh.rpc.convert import logprob_to_proto
from pdmesh.rpc.tls import TlsConfig
from pdmesh.v1 import inference_pb2 as ipb
from pdmesh.v1 import inference_pb2_grpc as igrpc
from services.gateway.core import Gateway

access_log = logging.getLogger("pdmesh.access")
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
          503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "min_tokens", "n", "prompt_logprobs", "skip_special_tokens")


def status_of(err: APIError) -> grpc.StatusCode:
    return _CODES.get(err.status, grpc.StatusCode.INTERNAL)


def _structured(so: ipb.StructuredOutput) -> dict[str, Any]:
    which = so.WhichOneof("kind")
    if which == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": so.json_schema}}}
    if which == "json_object":
        return {"response_format": {"type": "json_object"}} if so.json_object else {}
    if which == "regex":
        return {"guided_regex": so.regex}
    if which == "choice":
        return {"guided_choice": list(so.choice.choices)}
    if which == "grammar":
        return {"guided_grammar": so.grammar}
    return {}


def sampling_body(s: ipb.SamplingOptions, kind: str) -> dict[str, Any]:
    """SamplingOptions -> the HTTP API's fields (only those set)."""
    body: dict[str, Any] = {f: getattr(s, f) for f in _OPTIONAL if s.HasField(f)}
    if s.stop:
        body["stop"] = list(s.stop)
    if s.include_stop_str_in_output:
        body["include_stop_str_in_output"] = True
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.stop_token_ids:
        body["stop_token_ids"] = list(s.stop_token_ids)
    if s.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in s.logit_bias.items()}
    if s.HasField("logprobs"):
        if kind == "chat":
            body["logprobs"], body["top_logprobs"] = True, s.logprobs
        else:
            body["logprobs"] = s.logprobs
    if s.HasField("structured_output"):
        body.update(_structured(s.structured_output))
    return body


def _json_value(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"{what} is not valid JSON: {exc.msg}", param="tools") from None


def chat_body(request: ipb.ChatRequest) -> dict[str, Any]:
    """A ChatRequest as the HTTP API's body."""
    messages = []
    for m in request.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in m.tool_calls]
            msg["content"] = m.content or None
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    body: dict[str, Any] = {"messages": messages}
    if request.chat_template_kwargs:
        kwargs = {}
        for k, v in request.chat_template_kwargs.items():
            try:
                kwargs[k] = json.loads(v)
            except json.JSONDecodeError:
                kwargs[k] = v
        body["chat_template_kwargs"] = kwargs
    if request.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "strict": t.strict,
            **({"parameters": _json_value(t.parameters, f"tool {t.name!r} parameters")} if t.parameters else {})}}
            for t in request.tools]
    which = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if which == "mode":
        body["tool_choice"] = request.tool_choice.mode
    elif which == "function":
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.function}}
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    return body


class InferenceServicer(igrpc.InferenceServicer):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        header = dict(context.invocation_metadata() or ()).get("authorization")
        if not authorize(self.gw.api_keys, header):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key: send metadata 'authorization: Bearer <key>'")

    async def Generate(self, request: ipb.TextGenerationRequest, context: grpc.aio.ServicerContext):
        which = request.WhichOneof("prompt")
        body: dict[str, Any] = {}
        if which is not None:
            body["prompt"] = request.text if which == "text" else list(request.token_ids.ids)
        async for msg in self._run("Generate", request.model, body, request.sampling, "completion", context):
            yield msg

    async def Chat(self, request: ipb.ChatRequest, context: grpc.aio.ServicerContext):
        async for msg in self._run("Chat", request.model, lambda: chat_body(request), request.sampling, "chat", context):
            yield msg

    async def ListModels(self, request: ipb.ListModelsRequest, context: grpc.aio.ServicerContext) -> ipb.ListModelsResponse:
        await self._authorize(context)
        return ipb.ListModelsResponse(models=[ipb.Model(id=self.gw.served_name, max_model_len=self.gw.max_model_len, owned_by="pdmesh")])

    async def _run(self, method: str, model: str, body: Any, sampling: ipb.SamplingOptions, kind: str,
                   context: grpc.aio.ServicerContext):
        t0, rid, code = time.monotonic(), "-", grpc.StatusCode.OK
        try:
            async for msg in self._serve(model, body, sampling, kind, context):
                rid = msg.request_id
                yield msg
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
            raise
        finally:
            if self.gw.cfg.access_log:
                access_log.info("gRPC /pdmesh.v1.Inference/%s %s %.3fs id=%s client=%s", method,
                                code.name if isinstance(code, grpc.StatusCode) else code, time.monotonic() - t0, rid,
                                context.peer())

    async def _serve(self, model: str, body: Any, sampling: ipb.SamplingOptions, kind: str,
                     context: grpc.aio.ServicerContext):
        await self._authorize(context)
        gw = self.gw
        gw.metrics.inc("requests_received_total")
        try:
            body = body() if callable(body) else body
            if model:
                body["model"] = model
            body.update(sampling_body(sampling, kind))
            adm = gw.admit(body, kind)
        except APIError as err:
            await context.abort(status_of(err), gw.rejected(err).message)
        run = gw.launch(adm, tracecontext.from_context(context))
        try:
            try:
                await asyncio.gather(*(c.started for c in run.choices))
            except APIError as err:
                await context.abort(status_of(err), err.message)
            outs = {c.index: c.out for c in run.choices}
            remaining = len(run.choices)
            while remaining:
                d = await run.queue.get()
                if d.error is not None:
                    await context.abort(status_of(d.error), d.error.message)
                out = outs[d.index]
                msg = ipb.InferenceResponse(request_id=run.rid, index=d.index, text=(out.echo if d.first else "") + d.content,
                                            reasoning_text=d.reasoning, token_ids=d.token_ids or [],
                                            finish_reason=(finish_reason(out) or "") if d.finish_reason else "")
                if run.req.logprobs and d.logprobs:
                    msg.logprobs.extend(logprob_to_proto(lp) for lp in d.logprobs)
                if d.first and out.prompt_logprobs:
                    msg.prompt_logprobs.extend(logprob_to_proto(lp) for lp in out.prompt_logprobs)
                for t in d.tool_calls:
                    msg.tool_calls.add(index=t.index, id=t.id or "", name=t.name or "", arguments=t.arguments)
                yield msg
                if d.finish_reason is not None:
                    remaining -= 1
            u = gw.usage(run)
            yield ipb.InferenceResponse(request_id=run.rid, usage=ipb.Usage(
                prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"], total_tokens=u["total_tokens"],
                cached_tokens=u["prompt_tokens_details"]["cached_tokens"],
                reasoning_tokens=u["completion_tokens_details"]["reasoning_tokens"]))
        finally:
            await gw.end(run)


async def start_grpc_api(gw: Gateway, host: str, port: int, certfile: Optional[str] = None, keyfile: Optional[str] = None):
    """Serve Inference + grpc.health.v1 + reflection (over TLS with a certificate); returns (server, health)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection

    from pdmesh.rpc.server import Health, bind, make_server

    server = make_server()
    igrpc.add_InferenceServicer_to_server(InferenceServicer(gw), server)
    health = Health(server, ["pdmesh.v1.Inference"])
    reflection.enable_server_reflection((ipb.DESCRIPTOR.services_by_name["Inference"].full_name,
                                         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    bind(server, host, port, TlsConfig(tls_cert=certfile, tls_key=keyfile) if certfile else None, flag="--grpc-port")
    await server.start()
    return server, health
