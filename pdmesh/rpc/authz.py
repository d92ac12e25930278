"""Authorization of internal gRPC calls: which roles may call which method, enforced on every call
by a server interceptor that first authenticates the caller (``pdmesh.rpc.auth``).

* ``POLICY`` maps every internal method to the roles allowed to call it; a method missing from it is
  refused (default deny).  The standard health service is open to anyone (probes carry no
  credentials; it tells only SERVING or NOT_SERVING).
* Ownership (a worker id belongs to the identity that registered it, a request to the identity that
  started it) is checked by the servicers, which read the verified caller with ``caller()`` and
  refuse with PERMISSION_DENIED.
* Refusals: UNAUTHENTICATED (no or bad credentials) or PERMISSION_DENIED (role not allowed here,
  or not the owner in the servicer), logged (at most one line per method and code every
  ``LOG_EVERY_S`` seconds, with the count of the others) and reported to ``on_refused`` (metrics).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from typing import Callable, Optional

import grpc

from pdmesh.log import RateLimitedLog
from pdmesh.rpc.auth import ANONYMOUS, AuthError, BaseAuthenticator, Identity

log = logging.getLogger(__name__)

GATEWAY, SCHEDULER, PREFILL, DECODE, BOTH = "gateway", "scheduler", "prefill", "decode", "both"
WORKERS = frozenset({PREFILL, DECODE, BOTH})

POLICY: dict[str, frozenset[str]] = {
    # a worker joins, beats and leaves (as itself: the scheduler checks the id's owner)
    "/pdmesh.v1.Scheduler/Register": WORKERS,
    "/pdmesh.v1.Scheduler/Heartbeat": WORKERS,
    "/pdmesh.v1.Scheduler/Deregister": WORKERS,
    # only gateways route; gateways watch the workers, decode workers the prefill workers they may dial
    "/pdmesh.v1.Scheduler/Route": frozenset({GATEWAY}),
    "/pdmesh.v1.Scheduler/ListWorkers": frozenset({GATEWAY, DECODE}),
    # gateways start and abort requests (their own); releases (with the lease token) come from the
    # request's gateway or the lease's decode worker
    "/pdmesh.v1.Prefill/Prefill": frozenset({GATEWAY}),
    "/pdmesh.v1.Prefill/Release": frozenset({GATEWAY, DECODE}),
    "/pdmesh.v1.Prefill/Abort": frozenset({GATEWAY}),
    # only decode workers read KV (a pull with the lease token, for the lease's prompt)
    "/pdmesh.v1.KVTransfer/Pull": frozenset({DECODE}),
    "/pdmesh.v1.KVTransfer/BeginRead": frozenset({DECODE}),
    "/pdmesh.v1.KVTransfer/EndRead": frozenset({DECODE}),
    "/pdmesh.v1.KVTransfer/GetIpcHandle": frozenset({DECODE}),
    "/pdmesh.v1.KVTransfer/GetNixlMetadata": frozenset({DECODE}),
    "/pdmesh.v1.Decode/Generate": frozenset({GATEWAY}),
    "/pdmesh.v1.Decode/Abort": frozenset({GATEWAY}),
}
"""Roles allowed to call each internal method."""
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods anyone may call without credentials."""
LOG_EVERY_S = 5.0

_CALLER: contextvars.ContextVar[Identity] = contextvars.ContextVar("pdmesh_caller", default=ANONYMOUS)


def caller() -> Identity:
    """The verified identity of the caller of the RPC being served (``ANONYMOUS`` under
    ``--insecure-internal``, or outside an intercepted call)."""
    return _CALLER.get()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call (but ``OPEN_PREFIXES``) and checks its method against ``policy``."""

    def __init__(self, auth: BaseAuthenticator, policy: Optional[dict[str, frozenset[str]]] = None,
                 on_refused: Optional[Callable[[str, grpc.StatusCode], None]] = None) -> None:
        self.auth = auth
        self.policy = POLICY if policy is None else policy
        self.on_refused = on_refused
        """Called with (method, code) for every refused call (metrics)."""
        self._log = RateLimitedLog(log, LOG_EVERY_S)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        return _wrapped(handler, lambda context: self._admit(method, context), lambda context: self._after(method, context))

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        try:
            ident = self.auth.authenticate(method, context.invocation_metadata() or (), context.auth_context() or {})
        except AuthError as exc:
            await self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED, f"{method}: {exc}")
        allowed = self.policy.get(method)
        if self.auth.enforcing and (allowed is None or ident.role not in allowed):
            why = "is not in the authorization table" if allowed is None else f"is for {', '.join(sorted(allowed))} only"
            await self._refuse(context, method, grpc.StatusCode.PERMISSION_DENIED, f"{ident} may not call {method}: it {why}")
        _CALLER.set(ident)

    def _report(self, context, method: str, code: grpc.StatusCode, message: str) -> None:
        if self.on_refused is not None:
            self.on_refused(method, code)
        self._log.warning((method, code), "refused %s from %s: %s", code.name, context.peer(), message)

    async def _refuse(self, context, method: str, code: grpc.StatusCode, message: str) -> None:
        self._report(context, method, code, message)
        await context.abort(code, message)

    def _after(self, method: str, context) -> None:
        """A servicer's own refusal (not the owner) is reported like the interceptor's."""
        if context.code() == grpc.StatusCode.PERMISSION_DENIED:
            self._report(context, method, grpc.StatusCode.PERMISSION_DENIED, context.details() or "")


def _wrapped(handler: grpc.RpcMethodHandler, admit, after) -> grpc.RpcMethodHandler:
    """``handler`` with ``await admit(context)`` before its behaviour and ``after(context)`` once it
    ended (same kind, same serializers)."""
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler), ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler), ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attr, make in kinds:
        inner = getattr(handler, attr)
        if inner is None:
            continue
        behavior: Callable
        if inspect.isasyncgenfunction(inner):
            async def streaming(request, context, inner=inner):
                await admit(context)
                try:
                    async for msg in inner(request, context):
                        yield msg
                finally:
                    after(context)
            behavior = streaming
        else:
            async def unary(request, context, inner=inner):
                await admit(context)
                try:
                    return await inner(request, context)
                finally:
                    after(context)
            behavior = unary
        return make(behavior, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
    return handler
