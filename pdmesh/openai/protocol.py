"""OpenAI request validation: a request body (a dict, from JSON or built by the gRPC API) ->
one typed, validated ``OpenAIRequest``, or ``APIError``.

Every rejection names the offending field (``param``) and carries the HTTP status the gateway
returns.  Fields are handled as ``pdmesh.openai.fields`` lists them: supported ones are applied,
refused ones get a 400, unknown ones are ignored (and reported back for a warning).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

from pdmesh.engine.grammar import GrammarSpec
from pdmesh.engine.sequence import MAX_LOGPROBS, SamplingParams
from pdmesh.openai.errors import APIError, bad
from pdmesh.openai.fields import check_fields
from pdmesh.openai.messages import normalize_messages
from pdmesh.openai.structured import check_grammar, structured_output
from pdmesh.openai.tools import ToolParserName, ToolRequest, parse_tools
from pdmesh.openai.values import boolean, check_text, integer, is_int, is_number, number, obj, string, token_ids

__all__ = ["APIError", "OpenAIRequest", "RequestPolicy", "finalize_max_tokens", "parse_json_body", "parse_request"]


@dataclass(frozen=True)
class RequestPolicy:
    """What the server's configuration decides about requests."""

    max_model_len: int
    max_n: int = 16
    max_stop: int = 16
    max_stop_len: int = 512
    vocab_size: int = 0
    """Token ids in prompts, logit_bias and stop_token_ids must be below this (0: unchecked)."""
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)
    """Defaults for fields a request leaves unset (the model's generation_config.json)."""
    tool_call_parser: Optional[ToolParserName] = None
    enable_auto_tool_choice: bool = False


@dataclass(frozen=True)
class OpenAIRequest:
    kind: Literal["chat", "completion"]
    model: Optional[str]
    messages: Optional[list[dict[str, Any]]]
    """Chat: normalized messages (``pdmesh.openai.messages``)."""
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
    continuous_usage: bool = False
    """stream_options.continuous_usage_stats: every chunk carries the usage so far."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    tools: ToolRequest = field(default_factory=ToolRequest)
    prompt_logprobs_field: bool = False
    """vLLM's ``prompt_logprobs`` was asked for (shown as its own field)."""
    default_max_tokens: Optional[int] = None
    """The model's max_new_tokens (generation_config.json), when the request gives none."""
    ignored_fields: tuple[str, ...] = ()
    """Fields this server does not know (ignored; the gateway logs them)."""

    @property
    def echo_logprobs(self) -> bool:
        """Completions with echo and logprobs: the prompt's tokens lead the logprobs."""
        return self.kind == "completion" and self.echo and self.logprobs


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """An HTTP body -> a JSON object (400 if it is not one)."""
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
    return body


def _stop(body: dict, policy: RequestPolicy) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(items) > policy.max_stop:
        raise bad(f"'stop' has {len(items)} strings; at most {policy.max_stop} are allowed", "stop")
    for s in items:
        check_text(s, "stop")
        if len(s) > policy.max_stop_len:
            raise bad(f"each stop string must be at most {policy.max_stop_len} characters", "stop")
    return tuple(s for s in items if s)


def _prompts(body: dict, policy: RequestPolicy) -> list[Union[str, list[int]]]:
    p = body.get("prompt")
    if isinstance(p, str):
        items: list = [p]
    elif isinstance(p, list) and p and all(is_int(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        items = list(p)
    elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(is_int(t) for t in x) for x in p):
        items = list(p)
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids, or a list of such lists", "prompt")
    for it in items:
        if isinstance(it, str):
            if not it:
                raise bad("'prompt' must not be empty", "prompt")
            check_text(it, "prompt")
        elif policy.vocab_size and any(t < 0 or t >= policy.vocab_size for t in it):
            raise bad(f"prompt token ids must be in [0, {policy.vocab_size})", "prompt")
    return items


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    lb = body.get("logit_bias")
    if lb is None:
        return ()
    if not isinstance(lb, dict):
        raise bad("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for k, v in lb.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise bad(f"'logit_bias' key {k!r} is not a token id", "logit_bias") from None
        if tid < 0 or (vocab_size and tid >= vocab_size):
            raise bad(f"'logit_bias' token id {tid} is outside [0, {vocab_size})", "logit_bias")
        if not is_number(v) or not -100 <= v <= 100:
            raise bad(f"'logit_bias' bias for token {tid} must be a number in [-100, 100]", "logit_bias")
        out[tid] = float(v)
    return tuple(sorted(out.items()))


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    so = obj(body, "stream_options")
    for key in so:
        if key not in ("include_usage", "continuous_usage_stats", "include_obfuscation"):
            raise bad(f"'stream_options.{key}' is not a known option", "stream_options")
    if so.get("include_obfuscation"):
        raise bad("'stream_options.include_obfuscation' is not supported", "stream_options", "unsupported_parameter")
    include = boolean(so, "include_usage") if "include_usage" in so else False
    continuous = boolean(so, "continuous_usage_stats") if "continuous_usage_stats" in so else False
    if so and not stream:
        raise bad("'stream_options' needs 'stream': true", "stream_options")
    return include or continuous, continuous


def _grammar(body: dict, tools: ToolRequest) -> Optional[GrammarSpec]:
    spec, param = structured_output(body)
    if tools.grammar is not None:
        if spec is not None:
            raise bad(f"'{param}' cannot be combined with tool_choice '{tools.mode}'", param)
        check_grammar(tools.grammar, "tools")
        return tools.grammar
    return spec


def parse_request(body: dict[str, Any], kind: Literal["chat", "completion"], policy: RequestPolicy) -> OpenAIRequest:
    """Validate a /v1/chat/completions (kind='chat') or /v1/completions body."""
    ignored = check_fields(body, kind)
    model = string(body, "model")
    chat = kind == "chat"
    messages = normalize_messages(body) if chat else None
    prompts = _prompts(body, policy) if not chat else None
    gen = dict(policy.sampling_defaults)
    default_max = gen.pop("max_tokens", None)
    body = {**gen, **{k: v for k, v in body.items() if v is not None}}  # the model's defaults fill unset fields
    hi = policy.max_model_len
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = integer(body, "max_completion_tokens", None, 1, hi)
    else:
        max_tokens = integer(body, "max_tokens", None, 1, hi)
    n = integer(body, "n", 1, 1, policy.max_n) or 1
    if chat:
        logprobs = boolean(body, "logprobs")
        top = integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS) or 0
        if top and not logprobs:
            raise bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    else:
        lp = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
        logprobs, top = lp is not None, lp or 0
    stream = boolean(body, "stream")
    include_usage, continuous = _stream_options(body, stream)
    ctk = obj(body, "chat_template_kwargs")
    echo = boolean(body, "echo")
    plp = integer(body, "prompt_logprobs", None, 0, MAX_LOGPROBS)
    if plp is not None and stream:
        raise bad("'prompt_logprobs' is not available with 'stream': true", "prompt_logprobs")
    want_plp = plp if plp is not None else (top if echo and logprobs and not chat else None)
    tools = parse_tools(body, policy.tool_call_parser, policy.enable_auto_tool_choice) if chat else ToolRequest()
    grammar = _grammar(body, tools)
    min_tokens = integer(body, "min_tokens", 0, 0, max_tokens or hi) or 0
    if grammar is not None and min_tokens:
        raise bad("'min_tokens' cannot be combined with a structured output (the grammar decides where it ends)", "min_tokens")
    ignore_eos = boolean(body, "ignore_eos")
    if grammar is not None and ignore_eos:
        raise bad("'ignore_eos' cannot be combined with a structured output (the grammar decides where it ends)", "ignore_eos")
    add_gen, cont = boolean(body, "add_generation_prompt", True), boolean(body, "continue_final_message")
    if cont and (add_gen or messages[-1]["role"] != "assistant"):  # type: ignore[index]
        raise bad("'continue_final_message' needs a final assistant message and 'add_generation_prompt': false",
                  "continue_final_message")
    try:
        params = SamplingParams(
            n=n,
            temperature=number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=integer(body, "top_k", 0, -1, 1 << 30) or 0,
            min_p=number(body, "min_p", 0.0, 0.0, 1.0),
            seed=integer(body, "seed", None, -(2**63), 2**63 - 1),
            presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=number(body, "repetition_penalty", 1.0, 0.0, 2.0, lo_open=True),
            max_tokens=max_tokens or (min(int(default_max), hi) if default_max else 16),
            min_tokens=min_tokens,
            stop_token_ids=token_ids(body, "stop_token_ids", policy.vocab_size),
            stop=_stop(body, policy),
            include_stop_str_in_output=boolean(body, "include_stop_str_in_output"),
            ignore_eos=ignore_eos,
            logprobs=top if logprobs else None,
            skip_special_tokens=boolean(body, "skip_special_tokens", True),
            logit_bias=_logit_bias(body, policy.vocab_size),
            grammar=grammar,
            prompt_logprobs=want_plp,
        )
    except ValueError as exc:
        raise bad(str(exc)) from None
    return OpenAIRequest(kind, model, messages, prompts, params, max_tokens is not None, stream, include_usage,
                         logprobs, top, echo, dict(ctk), continuous, add_gen, cont,
                         boolean(body, "add_special_tokens", not chat), tools, plp is not None,
                         min(int(default_max), hi) if default_max else None, tuple(ignored))


def finalize_max_tokens(req: OpenAIRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Apply the context-length check (before any KV is allocated) and default max_tokens."""
    p = req.params
    param = "messages" if req.kind == "chat" else "prompt"
    if req.max_tokens_given:
        if prompt_len + p.max_tokens > max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                           f"{prompt_len + p.max_tokens} tokens ({prompt_len} in the messages, {p.max_tokens} in the completion). "
                           "Please reduce the length of the messages or completion.", param=param,
                           code="context_length_exceeded")
        return p
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len}.",
                       param=param, code="context_length_exceeded")
    default = room if req.kind == "chat" else min(16, room)
    if req.default_max_tokens is not None:
        default = min(req.default_max_tokens, room)
    return p.with_updates(max_tokens=default, min_tokens=min(p.min_tokens, default))
