"""The gateway's Starlette app: OpenAI routes, auth, limits, health.

Lifecycle of a request
----------------------
auth -> body size (413) -> JSON validation (400) -> model check (404) -> tokenize / chat template
-> context-length check (400 ``context_length_exceeded``, before any KV exists) -> backpressure
(429) -> every choice runs through the mesh concurrently; the response (or the SSE stream's
headers) waits for each choice's first token so that mesh errors get a real HTTP status; after
that, errors become an OpenAI ``error`` event and the stream closes.  A client that disconnects
cancels its choices, which aborts them on decode and prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pdmesh.engine.sequence import SamplingParams
from pdmesh.metrics import ServiceMetrics, watch_event_loop
from pdmesh.openai.protocol import APIError, Limits, OpenAIRequest, finalize_max_tokens, parse_request
from pdmesh.openai.reasoning import ReasoningParser
from pdmesh.rpc import tracecontext
from pdmesh.rpc.auth import BaseAuthenticator
from pdmesh.rpc.channels import ChannelPool
from pdmesh.rpc.server import channel_options
from pdmesh.rpc.tls import PLAINTEXT, TlsConfig
from pdmesh.telemetry import Telemetry, TracingConfig
from pdmesh.tokenizer import Tokenizer
from pdmesh.v1 import common_pb2 as pb
from services.gateway.choices import Choice, Delta, logprobs_chat, logprobs_completion, make_choices, run_choice
from services.gateway.config import GatewayConfig
from services.gateway.mesh_client import MeshClient

log = logging.getLogger(__name__)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Gateway:
    def __init__(self, cfg: GatewayConfig, tokenizer: Tokenizer, served_name: str, max_model_len: int,
                 tel: Optional[Telemetry] = None, tls: TlsConfig = PLAINTEXT,
                 auth: Optional[BaseAuthenticator] = None) -> None:
        self.cfg = cfg
        self.tel = tel or Telemetry(TracingConfig(tracing="off"), "gateway")
        self.tok = tokenizer
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.api_key = cfg.resolved_api_key()
        self.mesh = MeshClient(cfg.scheduler, route_timeout=cfg.route_timeout,
                               channels=ChannelPool(tls, auth, options=channel_options(cfg.keepalive)),
                               stream_idle_timeout=cfg.stream_idle_timeout)
        self.limits = Limits(max_model_len, cfg.max_n, cfg.max_stop, vocab_size=tokenizer.vocab_size)
        self.inflight = 0
        self.ready = False
        self.draining = False
        self.created = int(time.time())
        vocab = tokenizer.hf.get_vocab()
        mode = cfg.reasoning_parser
        self.reasoning = mode == "think" or (mode == "auto" and "<think>" in vocab and "</think>" in vocab)
        self._tasks: list[asyncio.Task] = []
        self.metrics = ServiceMetrics(served_name, "gateway", f"{cfg.host}:{cfg.port}")

    def on_tokens(self, c: Choice, first_index: int, token_ids: list[int]) -> None:
        for k, t in enumerate(token_ids):
            self.tel.token_event(c.span, first_index + k, **{"gen_ai.token.id": t, "pdmesh.choice": c.index})

    def on_done(self, c: Choice) -> None:
        self.record(c)

    def _finish_span(self, span, req: OpenAIRequest, rid: str, choices: list[Choice]) -> None:
        span.set_attributes({
            "gen_ai.response.id": rid,
            "gen_ai.response.finish_reasons": [c.finish_reason or c.outcome or "error" for c in choices],
            "gen_ai.usage.input_tokens": sum(len(c.prompt_ids) for c in choices if c.index % req.params.n == 0),
            "gen_ai.usage.output_tokens": sum(len(c.token_ids) for c in choices),
            "pdmesh.kv.transport": choices[0].trace.transport, "pdmesh.prefill_worker": choices[0].trace.prefill_worker,
            "pdmesh.decode_worker": choices[0].trace.decode_worker,
        })
        if self.tel.cfg.trace_include_text:
            span.set_attribute("gen_ai.completion", json.dumps([c.reasoning + c.text for c in choices]))
        if any(c.outcome.startswith("error") for c in choices):
            span.set_attribute("error.type", next(c.outcome for c in choices if c.outcome.startswith("error")))
        span.end()

    def record(self, c: Choice) -> None:
        """Metrics of one finished choice (client view)."""
        m = self.metrics
        if c.outcome == "aborted":
            m.inc("num_aborted_requests_total")
            return
        if c.outcome != "ok":
            m.inc("request_failure_total", reason=c.outcome.removeprefix("error:") or "unknown")
            return
        n = len(c.token_ids)
        m.inc("request_success_total", finished_reason=c.finish_reason or "stop")
        m.observe("time_to_first_token_seconds", c.first_at - c.arrival)
        m.observe("e2e_request_latency_seconds", c.last_at - c.arrival)
        if n > 1:
            m.observe("time_per_output_token_seconds", (c.last_at - c.first_at) / (n - 1))
        m.observe_many("inter_token_latency_seconds", c.itls)
        m.observe("request_prompt_tokens", len(c.prompt_ids))
        m.observe("request_generation_tokens", n)
        m.inc("prompt_tokens_total", len(c.prompt_ids))
        m.inc("generation_tokens_total", n)
        if c.trace.transport and c.trace.transfer_outcome == pb.TRANSFER_PULLED:
            m.inc("kv_transfer_bytes_total", c.trace.transfer_bytes, transport=c.trace.transport)
            m.observe("kv_transfer_seconds", c.trace.transfer_seconds, transport=c.trace.transport)

    # ------------------------------------------------------------------ lifecycle
    async def startup(self) -> None:
        if self.cfg.metrics_port >= 0:
            self.metrics.serve(self.cfg.metrics_port, self.cfg.host)
        self._tasks = [asyncio.create_task(self._watch_workers()), asyncio.create_task(watch_event_loop(self.metrics))]

    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.mesh.channels.close()
        self.tel.shutdown()

    async def _watch_workers(self) -> None:
        while True:
            try:
                resp = await self.mesh.list_workers()
                roles = {w.info.role for w in resp.workers if not w.draining and w.info.model == self.served_name}
                # a prefill/decode pair, or a colocated worker, can serve
                self.ready = {pb.ROLE_PREFILL, pb.ROLE_DECODE} <= roles or pb.ROLE_BOTH in roles
            except Exception:  # noqa: BLE001 - scheduler down: not ready
                self.ready = False
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ helpers
    def _authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:  # gone before its body arrived: a refusal in the books, never a lost request
            raise APIError(499, "the client closed the request before sending its body", "cancelled",
                           code="client_closed") from None
        return b"".join(chunks)

    def _prompt_ids(self, req: OpenAIRequest) -> list[list[int]]:
        if req.kind == "chat":
            try:
                return [self.tok.apply_chat_template(req.messages, **req.chat_template_kwargs)]
            except Exception as exc:  # noqa: BLE001 - template errors are the client's
                raise APIError(400, f"chat template failed: {exc}", param="messages") from None
        return [self.tok.encode(p) if isinstance(p, str) else list(p) for p in req.prompts]

    def _reasoning_parser(self, prompt_ids: list[int]) -> Optional[ReasoningParser]:
        if not self.reasoning:
            return None
        tail = self.tok.decode(prompt_ids[-8:], skip_special_tokens=False).rstrip()
        return ReasoningParser(in_reasoning=tail.endswith("<think>"))

    # ------------------------------------------------------------------ routes
    async def health(self, request: Request) -> Response:
        ok = self.ready and not self.draining
        return JSONResponse({"status": "ok" if ok else "unavailable", "ready": ok}, status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.served_name, "object": "model", "created": self.created, "owned_by": "pdmesh",
            "max_model_len": self.max_model_len}]})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    def rejected(self, err: APIError) -> APIError:
        """Count a request refused before it reached the mesh (the gateway's books:
        received = rejected + finished{ok, error, aborted})."""
        self.metrics.inc("requests_rejected_total", status=str(err.status))
        return err

    def admit(self, raw: bytes, kind: str) -> tuple[OpenAIRequest, list[list[int]], list[SamplingParams]]:
        """Validation through backpressure, for HTTP and gRPC alike; raises APIError."""
        req = parse_request(raw, kind, self.limits)
        if req.model is not None and req.model != self.served_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        prompts = self._prompt_ids(req)
        params = [finalize_max_tokens(req, len(p), self.max_model_len) for p in prompts]
        if self.draining or not self.ready:
            raise APIError(503, "no workers are available to serve this request", "service_unavailable",
                           code="no_workers", headers={"Retry-After": "1"})
        if self.inflight >= self.cfg.max_inflight:
            raise APIError(429, "the server is at capacity; retry shortly", "rate_limit_error", code="too_many_requests",
                           headers={"Retry-After": "1"})
        return req, prompts, params

    def launch(self, req: OpenAIRequest, prompts: list[list[int]], params: list[SamplingParams],
               incoming: Optional[str]) -> "Launched":
        """Start every choice of an admitted request; ``end_request`` must follow, exactly once."""
        op = "chat" if req.kind == "chat" else "text_completion"
        span = self.tel.start(f"{op} {self.served_name}", incoming, attributes={
            "gen_ai.operation.name": op, "gen_ai.system": "pdmesh", "gen_ai.request.model": self.served_name,
            "gen_ai.request.max_tokens": params[0].max_tokens, "gen_ai.request.temperature": req.params.temperature,
            "gen_ai.request.top_p": req.params.top_p, "gen_ai.request.choice.count": req.params.n})
        if self.tel.cfg.trace_include_text:
            span.set_attribute("gen_ai.prompt", json.dumps(req.messages if req.kind == "chat" else req.prompts))
        traceparent = self.tel.traceparent(span, incoming)
        choices = make_choices(prompts, params, req.params.n, traceparent)
        for c in choices:
            c.span = span
        queue: asyncio.Queue = asyncio.Queue()
        self.inflight += 1
        self.metrics.set("num_requests_running", self.inflight)
        tasks = [asyncio.create_task(run_choice(self.mesh, self.served_name, self.tok, c, queue, self.cfg.request_timeout,
                                                self._reasoning_parser(c.prompt_ids), self)) for c in choices]
        rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + choices[0].request_id.split("-")[0]
        return Launched(req, rid, choices, tasks, queue, span, traceparent)

    async def _generate(self, request: Request, kind: str) -> Response:
        self.metrics.inc("requests_received_total")
        try:
            req, prompts, params = self.admit(await self._body(request), kind)
        except APIError as err:
            return error_response(self.rejected(err))
        incoming = request.headers.get("traceparent")
        run = self.launch(req, prompts, params, incoming if tracecontext.valid(incoming) else None)
        rid, choices, tasks, queue, span, traceparent = run.rid, run.choices, run.tasks, run.queue, run.span, run.traceparent
        handed_off = False
        try:
            try:
                await self._until_disconnect(request, asyncio.gather(*(c.started for c in choices)))
            except APIError as err:
                return error_response(err)
            if req.stream:
                handed_off = True
                return _ClosingStream(self._sse(req, rid, choices, tasks, queue, span), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Request-Id": rid, "traceparent": traceparent})
            await self._until_disconnect(request, asyncio.gather(*tasks))
            errors = [d.error for d in self._drain(queue) if d.error is not None]
            if errors:
                return error_response(errors[0])
            return JSONResponse(self._full_response(req, rid, choices), headers={"X-Request-Id": rid, "traceparent": traceparent})
        except _Disconnected:
            return Response(status_code=499)
        finally:
            if not handed_off:
                await self._end_request(tasks, span, req, rid, choices)

    async def _end_request(self, tasks: list[asyncio.Task], span, req: OpenAIRequest, rid: str, choices: list[Choice]) -> None:
        """Every request ends here once: choices cancelled (aborting them in the mesh) or done."""
        for t in tasks:
            t.cancel()
        try:  # the caller may itself be cancelled (client gone): the books are kept regardless
            await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        finally:
            self._close_books(span, req, rid, choices)

    def _close_books(self, span, req: OpenAIRequest, rid: str, choices: list[Choice]) -> None:
        self.inflight -= 1
        self.metrics.set("num_requests_running", self.inflight)
        outcomes = {c.outcome.split(":")[0] for c in choices}
        self.metrics.inc("requests_finished_total", outcome="error" if "error" in outcomes else
                         "aborted" if outcomes - {"ok"} else "ok")  # '' : cancelled before it ran
        self._finish_span(span, req, rid, choices)

    @staticmethod
    def _drain(queue: asyncio.Queue) -> list[Delta]:
        out = []
        while not queue.empty():
            out.append(queue.get_nowait())
        return out

    async def _until_disconnect(self, request: Request, aw) -> Any:
        work = asyncio.ensure_future(aw)

        async def watch() -> None:
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if work not in done:
            work.cancel()
            work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: nothing to log
            raise _Disconnected()
        return work.result()

    # ------------------------------------------------------------------ responses
    def _usage(self, choices: list[Choice]) -> dict[str, Any]:
        seen: set[int] = set()
        prompt_tokens, cached = 0, 0
        for c in choices:
            if id(c.prompt_ids) not in seen:
                seen.add(id(c.prompt_ids))
                prompt_tokens += len(c.prompt_ids)
                cached += c.trace.num_cached_tokens
        completion = sum(len(c.token_ids) for c in choices)
        return {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": sum(c.reasoning_tokens for c in choices)},
        }

    def _full_response(self, req: OpenAIRequest, rid: str, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for c in choices:
            if req.kind == "chat":
                msg: dict[str, Any] = {"role": "assistant", "content": c.text}
                if self.reasoning:
                    msg["reasoning_content"] = c.reasoning or None
                out.append({"index": c.index, "message": msg, "finish_reason": c.finish_reason,
                            "logprobs": logprobs_chat(self.tok, c.logprobs) if req.logprobs else None})
            else:
                out.append({"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                            "logprobs": logprobs_completion(self.tok, c.logprobs) if req.logprobs else None})
        return {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.served_name, "choices": out, "usage": self._usage(choices)}

    async def _sse(self, req: OpenAIRequest, rid: str, choices: list[Choice], tasks: list[asyncio.Task],
                   queue: asyncio.Queue, span) -> AsyncIterator[bytes]:
        created = int(time.time())
        obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        usage_null = {"usage": None} if req.include_usage else {}

        def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> bytes:
            body = {"id": rid, "object": obj, "created": created, "model": self.served_name, "choices": choice_list}
            body.update(usage_null)
            body.update(extra)
            return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

        try:
            if req.kind == "chat":
                for c in choices:
                    yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            remaining = len(choices)
            while remaining:
                d: Delta = await queue.get()
                if d.error is not None:
                    yield b"data: " + json.dumps(d.error.body()).encode() + b"\n\n"
                    return
                if not (d.content or d.reasoning or d.finish_reason or (req.logprobs and d.logprobs)):
                    continue  # token ids without text yet (a split UTF-8 character): nothing to send
                lp = None
                if req.logprobs and d.logprobs:
                    lp = logprobs_chat(self.tok, d.logprobs) if req.kind == "chat" else logprobs_completion(self.tok, d.logprobs)
                if req.kind == "chat":
                    delta: dict[str, Any] = {}
                    if d.reasoning:
                        delta["reasoning_content"] = d.reasoning
                    if d.content or not d.reasoning:
                        delta["content"] = d.content
                    if d.finish_reason and not d.content and not d.reasoning:
                        delta = {}
                    yield chunk([{"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}])
                else:
                    yield chunk([{"index": d.index, "text": d.content, "logprobs": lp, "finish_reason": d.finish_reason}])
                if d.finish_reason is not None:
                    remaining -= 1
            if req.include_usage:
                body = {"id": rid, "object": obj, "created": created, "model": self.served_name, "choices": [],
                        "usage": self._usage(choices)}
                yield b"data: " + json.dumps(body).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            await self._end_request(tasks, span, req, rid, choices)


class _Disconnected(Exception):
    pass


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its generator as soon as the response ends, however it
    ends (a client that disconnects mid-stream included), so that the request's ``finally`` —
    aborting its choices in the mesh, freeing KV — runs now, not whenever the GC finalizes it."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


@dataclass
class Launched:
    """A request whose choices are running in the mesh."""

    req: OpenAIRequest
    rid: str
    choices: list[Choice]
    tasks: list[asyncio.Task]
    queue: asyncio.Queue
    span: Any
    traceparent: str


def build_app(gw: Gateway) -> "_AuthWrapper":
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gw.startup()
        try:
            yield
        finally:
            await gw.shutdown()

    routes = [
        Route("/health", gw.health, methods=["GET"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/chat/completions", gw.chat, methods=["POST"]),
        Route("/v1/completions", gw.completions, methods=["POST"]),
    ]
    return _AuthWrapper(Starlette(routes=routes, lifespan=lifespan), gw)


class _AuthWrapper:
    """ASGI middleware: API key on every route but /health; 401 in the OpenAI shape."""

    def __init__(self, app, gw: Gateway) -> None:
        self.app = app
        self.gw = gw

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health" and self.gw.api_key:
            req = Request(scope, receive)
            if not self.gw._authorized(req):
                err = APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)
