"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Optional


class APIError(Exception):
    """A request the API answers with an error; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 naming ``param``."""
    return APIError(400, message, "invalid_request_error", param, code)


def not_supported(param: str, why: str = "") -> APIError:
    """A 400 for a field this server does not implement (never silently ignored)."""
    return APIError(400, f"'{param}' is not supported by this server{': ' + why if why else ''}", "invalid_request_error",
                    param, "unsupported_parameter")
