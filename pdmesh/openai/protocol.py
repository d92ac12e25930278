"""OpenAI request validation: JSON bodies -> typed, validated requests, or ``APIError``.

Every rejection names the offending field (``param``) and carries the HTTP status the gateway
returns; bodies follow OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pdmesh.engine.sequence import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None) -> None:
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
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass(frozen=True)
class Limits:
    """Gateway-side request limits."""

    max_model_len: int
    max_n: int = 16
    max_stop: int = 16
    max_stop_len: int = 512
    vocab_size: int = 0
    """Token ids in prompts must be below this (0: unchecked)."""


@dataclass(frozen=True)
class OpenAIRequest:
    kind: str
    """'chat' or 'completion'."""
    model: Optional[str]
    messages: Optional[list[dict[str, Any]]]
    prompts: Optional[list[Union[str, list[int]]]]
    params: SamplingParams
    """max_tokens is provisional when ``max_tokens_given`` is False."""
    max_tokens_given: bool
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


_NUMBER = (int, float)


def _is_number(v: Any) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_text(s: str, param: str) -> str:
    if "\x00" in s:
        raise bad(f"'{param}' contains a NUL character", param)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"'{param}' contains an unpaired UTF-16 surrogate", param) from None
    return s


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not _is_number(v):
        raise bad(f"'{key}' must be a number", key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}]; got {v}", key)
    return float(v)


def _int(body: dict, key: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(f"'{key}' must be an integer", key)
    if v < lo or v > hi:
        raise bad(f"'{key}' must be in [{lo}, {hi}]; got {v}", key)
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean", key)
    return v


def _stop(body: dict, limits: Limits) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(items) > limits.max_stop:
        raise bad(f"'stop' has {len(items)} strings; at most {limits.max_stop} are allowed", "stop")
    for s in items:
        _check_text(s, "stop")
        if len(s) > limits.max_stop_len:
            raise bad(f"each stop string must be at most {limits.max_stop_len} characters", "stop")
    return tuple(s for s in items if s)


def _messages(body: dict) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise bad(f"messages[{i}].role must be one of system, user, assistant, tool, developer", "messages")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content: only text parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": "system" if role == "developer" else role, "content": _check_text(content, "messages")})
    return out


def _prompts(body: dict, limits: Limits) -> list[Union[str, list[int]]]:
    p = body.get("prompt")
    if isinstance(p, str):
        items: list = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        items = list(p)
    elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
        items = list(p)
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids, or a list of such lists", "prompt")
    for it in items:
        if isinstance(it, str):
            if not it:
                raise bad("'prompt' must not be empty", "prompt")
            _check_text(it, "prompt")
        elif limits.vocab_size and any(t < 0 or t >= limits.vocab_size for t in it):
            raise bad(f"prompt token ids must be in [0, {limits.vocab_size})", "prompt")
    return items


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def parse_request(raw: bytes, kind: str, limits: Limits) -> OpenAIRequest:
    """Parse and validate a /v1/chat/completions (kind='chat') or /v1/completions body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("request body is not valid UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise bad(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    messages = _messages(body) if kind == "chat" else None
    prompts = _prompts(body, limits) if kind == "completion" else None
    hi = limits.max_model_len
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", None, 1, hi)
    else:
        max_tokens = _int(body, "max_tokens", None, 1, hi)
    n = _int(body, "n", 1, 1, limits.max_n)
    if kind == "chat":
        logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, 0, 20)
        if top and not logprobs:
            raise bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    else:
        lp = _int(body, "logprobs", None, 0, 20)
        logprobs, top = lp is not None, lp or 0
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    stream = _bool(body, "stream")
    include_usage = bool(so and so.get("include_usage"))
    if so and not isinstance(so.get("include_usage", False), bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options")
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    ctk = body.get("chat_template_kwargs") or {}
    if not isinstance(ctk, dict):
        raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    try:
        params = SamplingParams(
            n=n,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=_int(body, "top_k", 0, -1, 1 << 30),
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            seed=seed,
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 2.0, lo_open=True),
            max_tokens=max_tokens or 16,
            min_tokens=_int(body, "min_tokens", 0, 0, max_tokens or hi),
            stop=_stop(body, limits),
            include_stop_str_in_output=_bool(body, "include_stop_str_in_output"),
            ignore_eos=_bool(body, "ignore_eos"),
            logprobs=top if logprobs else None,
            skip_special_tokens=_bool(body, "skip_special_tokens", True),
        )
    except ValueError as exc:
        raise bad(str(exc)) from None
    return OpenAIRequest(kind, model, messages, prompts, params, max_tokens is not None, stream, include_usage,
                         logprobs, top, _bool(body, "echo"), dict(ctk))


def finalize_max_tokens(req: OpenAIRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Apply the context-length check (before any KV is allocated) and default max_tokens."""
    p = req.params
    if req.max_tokens_given:
        if prompt_len + p.max_tokens > max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                           f"{prompt_len + p.max_tokens} tokens ({prompt_len} in the messages, {p.max_tokens} in the completion). "
                           "Please reduce the length of the messages or completion.", param="messages" if req.kind == "chat" else "prompt",
                           code="context_length_exceeded")
        return p
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len}.",
                       param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
    default = room if req.kind == "chat" else min(16, room)
    return p.with_updates(max_tokens=default, min_tokens=min(p.min_tokens, default))
