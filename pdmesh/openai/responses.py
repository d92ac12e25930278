"""OpenAI response shapes: full chat/completion responses, SSE chunks, usage, logprobs, tool calls.

Everything here is a pure function of the request (``OpenAIRequest``) and the choices' outputs
(``ChoiceOutput`` / ``Delta``); the gateway only moves the bytes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Optional

from pdmesh.engine.sequence import TokenLogprob
from pdmesh.openai.errors import APIError
from pdmesh.openai.protocol import OpenAIRequest
from pdmesh.openai.stream import ChoiceOutput, Delta
from pdmesh.openai.tool_parsers import ToolCall, ToolCallDelta
from pdmesh.tokenizer import Tokenizer


def usage(choices: Iterable[ChoiceOutput]) -> dict[str, Any]:
    """Usage of a request: each distinct prompt counted once (n choices share theirs)."""
    seen: set[int] = set()
    prompt_tokens = cached = completion = reasoning = 0
    for c in choices:
        if id(c.prompt_ids) not in seen:
            seen.add(id(c.prompt_ids))
            prompt_tokens += len(c.prompt_ids)
            cached += c.num_cached_tokens
        completion += len(c.token_ids)
        reasoning += c.reasoning_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}, "completion_tokens_details": {"reasoning_tokens": reasoning}}


def finish_reason(c: ChoiceOutput) -> Optional[str]:
    """'tool_calls' when the model called tools and stopped (not when it ran out of tokens)."""
    return "tool_calls" if c.tool_calls and c.finish_reason == "stop" else c.finish_reason


# ---------------------------------------------------------------------- logprobs

def _token_text(tok: Tokenizer, tid: int) -> str:
    return tok.decode([tid], skip_special_tokens=False)


def logprobs_chat(tok: Tokenizer, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = _token_text(tok, tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(x.token_id, x.logprob), top_logprobs=[entry(t, v) for t, v in x.top]) for x in lps]}


def logprobs_completion(tok: Tokenizer, lps: list[Optional[TokenLogprob]], offset: int = 0,
                        first_token: Optional[int] = None) -> dict[str, Any]:
    """Legacy completions logprobs; ``first_token`` (echo) leads with the prompt's first token,
    which has no logprob."""
    tokens, offsets, values, tops, pos = [], [], [], [], offset
    items: list[tuple[int, Optional[TokenLogprob]]] = [(first_token, None)] if first_token is not None else []
    items += [(x.token_id, x) for x in lps if x is not None]
    for tid, x in items:
        s = _token_text(tok, tid)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        values.append(x.logprob if x is not None else None)
        tops.append({_token_text(tok, t): v for t, v in x.top} if x is not None else None)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(tok: Tokenizer, prompt_ids: list[int], lps: list[TokenLogprob]) -> list[Optional[dict[str, Any]]]:
    """vLLM's ``prompt_logprobs``: None for the first prompt token, then {token id: {logprob, rank,
    decoded_token}} with the token itself and its top alternatives."""
    out: list[Optional[dict[str, Any]]] = [None]
    for x in lps:
        d = {str(x.token_id): {"logprob": x.logprob, "rank": x.rank, "decoded_token": _token_text(tok, x.token_id)}}
        for r, (t, v) in enumerate(x.top, 1):
            d.setdefault(str(t), {"logprob": v, "rank": r, "decoded_token": _token_text(tok, t)})
        out.append(d)
    return out[:len(prompt_ids)]


# ---------------------------------------------------------------------- tool calls

def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def tool_call_deltas(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    out = []
    for d in deltas:
        item: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments}}
        if d.id is not None:
            item["id"], item["type"] = d.id, "function"
            item["function"]["name"] = d.name
        out.append(item)
    return out


# ---------------------------------------------------------------------- full responses

def _chat_choice(req: OpenAIRequest, tok: Tokenizer, c: ChoiceOutput, reasoning: bool) -> dict[str, Any]:
    content: Optional[str] = c.echo + c.text
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if c.tool_calls:
        msg["content"] = content or None
        msg["tool_calls"] = tool_calls_json(c.tool_calls)
    if reasoning:
        msg["reasoning_content"] = c.reasoning or None
    return {"index": c.index, "message": msg, "finish_reason": finish_reason(c),
            "logprobs": logprobs_chat(tok, c.logprobs) if req.logprobs else None}


def _completion_choice(req: OpenAIRequest, tok: Tokenizer, c: ChoiceOutput) -> dict[str, Any]:
    out: dict[str, Any] = {"index": c.index, "text": c.echo + c.text, "finish_reason": finish_reason(c), "logprobs": None}
    if req.logprobs:
        lps: list[Optional[TokenLogprob]] = list(c.logprobs)
        first = None
        if req.echo and c.prompt_logprobs is not None:
            lps = [*c.prompt_logprobs, *lps]
            first = c.prompt_ids[0]
        out["logprobs"] = logprobs_completion(tok, lps, first_token=first)
    if req.prompt_logprobs_field and c.prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs(tok, c.prompt_ids, c.prompt_logprobs)
    return out


def full_response(req: OpenAIRequest, rid: str, model: str, tok: Tokenizer, choices: list[ChoiceOutput],
                  reasoning: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                            "created": int(time.time()), "model": model}
    if req.kind == "chat":
        body["choices"] = [_chat_choice(req, tok, c, reasoning) for c in choices]
        if req.prompt_logprobs_field and choices and choices[0].prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs(tok, choices[0].prompt_ids, choices[0].prompt_logprobs)
    else:
        body["choices"] = [_completion_choice(req, tok, c) for c in choices]
    body["usage"] = usage(choices)
    return body


# ---------------------------------------------------------------------- streaming

class ChunkWriter:
    """SSE ``data:`` lines of one streamed response."""

    def __init__(self, req: OpenAIRequest, rid: str, model: str, tok: Tokenizer) -> None:
        self.req, self.rid, self.model, self.tok = req, rid, model, tok
        self.created = int(time.time())
        self.obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"

    @staticmethod
    def _line(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    def _chunk(self, choices: list[dict[str, Any]], usage_now: Optional[dict[str, Any]] = None) -> bytes:
        body: dict[str, Any] = {"id": self.rid, "object": self.obj, "created": self.created, "model": self.model,
                                "choices": choices}
        if self.req.include_usage:
            body["usage"] = usage_now if self.req.continuous_usage else None
        return self._line(body)

    def role_chunk(self, index: int, usage_now: Optional[dict[str, Any]] = None) -> bytes:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], usage_now)

    def delta_chunk(self, d: Delta, c: ChoiceOutput, usage_now: Optional[dict[str, Any]]) -> Optional[bytes]:
        """The chunk for one delta of choice ``c`` (None: nothing to send yet)."""
        req = self.req
        lead = c.echo if d.first else ""
        if d.empty and not lead:
            return None  # token ids without text yet (a split UTF-8 character)
        finish = finish_reason(c) if d.finish_reason is not None else None
        if req.kind == "completion":
            lp = None
            if req.logprobs and (d.logprobs or (d.first and req.echo_logprobs)):
                lps: list[Optional[TokenLogprob]] = list(d.logprobs or [])
                first = None
                if d.first and req.echo_logprobs and c.prompt_logprobs is not None:
                    lps, first = [*c.prompt_logprobs, *lps], c.prompt_ids[0]
                lp = logprobs_completion(self.tok, lps, first_token=first)
            return self._chunk([{"index": d.index, "text": lead + d.content, "logprobs": lp, "finish_reason": finish}],
                               usage_now)
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.content or lead or not (d.reasoning or d.tool_calls or d.finish_reason):
            delta["content"] = lead + d.content
        if d.tool_calls:
            delta["tool_calls"] = tool_call_deltas(d.tool_calls)
        lp = logprobs_chat(self.tok, d.logprobs) if req.logprobs and d.logprobs else None
        return self._chunk([{"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": finish}], usage_now)

    def usage_chunk(self, choices: list[ChoiceOutput]) -> bytes:
        return self._line({"id": self.rid, "object": self.obj, "created": self.created, "model": self.model,
                           "choices": [], "usage": usage(choices)})

    @staticmethod
    def error_chunk(err: APIError) -> bytes:
        return b"data: " + json.dumps(err.body()).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
