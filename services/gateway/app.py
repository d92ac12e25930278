"""The gateway's HTTP front end (Starlette): OpenAI routes, vLLM's tokenizer routes, health,
version, metrics; API keys, an access log, and errors in OpenAI's JSON shape (404 and 405 too).

A generation request goes ``Gateway.admit`` -> ``launch`` -> ``end`` (services.gateway.core); the
response (or the SSE stream's headers) waits for each choice's first token so that mesh errors
get a real HTTP status; after that, errors become an OpenAI ``error`` event and the stream closes.
A client that disconnects cancels its choices, which aborts them on decode and prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, AsyncGenerator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pdmesh import __version__
from pdmesh.openai.auth import UNAUTHORIZED, authorize
from pdmesh.openai.errors import APIError
from pdmesh.openai.protocol import parse_json_body
from pdmesh.openai.responses import ChunkWriter, full_response
from pdmesh.openai.stream import Delta
from pdmesh.rpc import tracecontext
from services.gateway.core import Gateway, Launched

access_log = logging.getLogger("pdmesh.access")
PUBLIC_PATHS = ("/health", "/version")
"""Routes served without an API key."""


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _Disconnected(Exception):
    pass


class HttpApi:
    """Route handlers over one ``Gateway``."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def _body(self, request: Request) -> bytes:
        limit = self.gw.cfg.max_request_bytes
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

    # ------------------------------------------------------------------ small routes
    async def health(self, request: Request) -> Response:
        gw = self.gw
        ok = gw.ready and not gw.draining
        return JSONResponse({"status": "ok" if ok else "unavailable", "ready": ok}, status_code=200 if ok else 503)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    def _model(self) -> dict[str, Any]:
        gw = self.gw
        return {"id": gw.served_name, "object": "model", "created": gw.created, "owned_by": "pdmesh",
                "max_model_len": gw.max_model_len}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.gw.served_name:
            return error_response(APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found"))
        return JSONResponse(self._model())

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def tokenize(self, request: Request) -> Response:
        return await self._json_route(request, self.gw.tokenize)

    async def detokenize(self, request: Request) -> Response:
        return await self._json_route(request, self.gw.detokenize)

    async def _json_route(self, request: Request, fn) -> Response:
        try:
            return JSONResponse(fn(parse_json_body(await self._body(request))))
        except APIError as err:
            return error_response(err)

    # ------------------------------------------------------------------ generation
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str) -> Response:
        gw = self.gw
        gw.metrics.inc("requests_received_total")
        try:
            adm = gw.admit(parse_json_body(await self._body(request)), kind)
        except APIError as err:
            return error_response(gw.rejected(err))
        incoming = request.headers.get("traceparent")
        run = gw.launch(adm, incoming if tracecontext.valid(incoming) else None)
        headers = {"X-Request-Id": run.rid, "traceparent": run.traceparent}
        handed_off = False
        try:
            try:
                await self._until_disconnect(request, asyncio.gather(*(c.started for c in run.choices)))
            except APIError as err:
                return error_response(err)
            if run.req.stream:
                handed_off = True
                return _ClosingStream(self._sse(run), media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", **headers})
            await self._until_disconnect(request, asyncio.gather(*run.tasks))
            errors = [d.error for d in _drain(run.queue) if d.error is not None]
            if errors:
                return error_response(errors[0])
            return JSONResponse(full_response(run.req, run.rid, gw.served_name, gw.tok, [c.out for c in run.choices],
                                              gw.reasoning), headers=headers)
        except _Disconnected:
            return Response(status_code=499)
        finally:
            if not handed_off:
                await gw.end(run)

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

    async def _sse(self, run: Launched) -> AsyncGenerator[bytes, None]:
        gw, req = self.gw, run.req
        w = ChunkWriter(req, run.rid, gw.served_name, gw.tok)
        outs = {c.index: c.out for c in run.choices}
        try:
            if req.kind == "chat":
                for c in run.choices:
                    yield w.role_chunk(c.index, gw.usage(run) if req.continuous_usage else None)
            remaining = len(run.choices)
            while remaining:
                d: Delta = await run.queue.get()
                if d.error is not None:
                    yield w.error_chunk(d.error)
                    return
                chunk = w.delta_chunk(d, outs[d.index], gw.usage(run) if req.continuous_usage else None)
                if chunk is not None:
                    yield chunk
                if d.finish_reason is not None:
                    remaining -= 1
            if req.include_usage:
                yield w.usage_chunk(list(outs.values()))
            yield w.DONE
        finally:
            await gw.end(run)


def _drain(queue: asyncio.Queue) -> list[Delta]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its generator as soon as the response ends, however it
    ends (a client that disconnects mid-stream included), so that the request's ``finally`` —
    aborting its choices in the mesh, freeing KV — runs now, not whenever the GC finalizes it."""

    def __init__(self, content: AsyncGenerator[bytes, None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._content = content  # the body_iterator itself, typed as the generator it is

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._content.aclose()


async def _http_error(request: Request, exc: Exception) -> Response:
    """404 and 405 from the router, in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        err = APIError(405, f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed",
                       headers=dict(exc.headers or {}))
    elif exc.status_code == 404:
        err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
    else:
        err = APIError(exc.status_code, str(exc.detail), code="http_error")
    return error_response(err)


def build_app(gw: Gateway) -> "Gatekeeper":
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gw.startup()
        try:
            yield
        finally:
            await gw.shutdown()

    api = HttpApi(gw)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/version", api.version, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    return Gatekeeper(app, gw)


class Gatekeeper:
    """ASGI middleware around every HTTP request: the API key (all routes but /health and
    /version; 401 in OpenAI's shape), an ``X-Request-Id`` on every response, and one access-log
    line when the response has ended (method, path, status, seconds, request id; never a body)."""

    def __init__(self, app, gw: Gateway) -> None:
        self.app = app
        self.gw = gw

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        state = {"status": 0, "rid": ""}

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = list(message.get("headers", []))
                rid = next((v.decode() for k, v in headers if k.lower() == b"x-request-id"), "")
                if not rid:
                    rid = "req-" + uuid.uuid4().hex[:16]
                    headers.append((b"x-request-id", rid.encode()))
                    message = dict(message, headers=headers)
                state["rid"] = rid
            await send(message)

        try:
            if scope["path"] not in PUBLIC_PATHS and not authorize(self.gw.api_keys, _header(scope, b"authorization")):
                await error_response(APIError(401, UNAUTHORIZED, code="invalid_api_key"))(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            if self.gw.cfg.access_log:
                client = scope.get("client") or ("-", 0)
                access_log.info("%s %s %s %.3fs id=%s client=%s:%s", scope["method"], scope["path"],
                                state["status"] or 499, time.monotonic() - t0, state["rid"] or "-", client[0], client[1])


def _header(scope, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == name), "")
