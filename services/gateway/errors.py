"""Mapping mesh (gRPC) failures to OpenAI-shaped HTTP errors."""

from __future__ import annotations

import grpc

from pdmesh.openai.errors import APIError

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


def mesh_error_to_api(exc) -> APIError:
    status, typ = _STATUS.get(exc.code, (500, "internal_error"))
    headers = {"Retry-After": "1"} if status in (429, 503) else {}
    return APIError(status, exc.message, typ, None, exc.code.name.lower(), headers)
