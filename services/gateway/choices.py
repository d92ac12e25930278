"""Turning one choice's token events into OpenAI text: incremental detokenization, stop strings,
reasoning split, logprob shapes; and running all choices of a request concurrently."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from pdmesh.engine.llm import child_seed
from pdmesh.engine.sequence import SamplingParams, TokenLogprob
from pdmesh.openai.protocol import APIError
from pdmesh.openai.reasoning import ReasoningParser
from pdmesh.tokenizer import StopStringMatcher, Tokenizer
from services.gateway.errors import mesh_error_to_api
from services.gateway.mesh_client import MeshClient, MeshError, RequestTrace

log = logging.getLogger(__name__)


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    trace: RequestTrace = field(default_factory=RequestTrace)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""
    reasoning_tokens: int = 0
    finish_reason: Optional[str] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    started: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    arrival: float = field(default_factory=time.monotonic)
    first_at: float = 0.0
    last_at: float = 0.0
    itls: list[float] = field(default_factory=list)
    outcome: str = ""
    """'ok', 'aborted' or 'error:<grpc code>' once the choice ended."""
    span: Any = None
    """The request's gateway span (token events go there)."""


@dataclass
class Delta:
    index: int
    reasoning: str = ""
    content: str = ""
    logprobs: Optional[list[TokenLogprob]] = None
    token_ids: Optional[list[int]] = None
    finish_reason: Optional[str] = None
    error: Optional[APIError] = None


class TextPipeline:
    def __init__(self, tok: Tokenizer, choice: Choice, reasoning: Optional[ReasoningParser]) -> None:
        self.detok = tok.detokenizer(choice.prompt_ids, choice.params.skip_special_tokens)
        self.stop = StopStringMatcher(choice.params.stop, choice.params.include_stop_str_in_output)
        self.reasoning = reasoning

    def _split(self, text: str) -> tuple[str, str]:
        return self.reasoning.feed(text) if self.reasoning else ("", text)

    def add(self, token_ids: list[int]) -> tuple[str, str, bool]:
        text = "".join(self.detok.step(t) for t in token_ids)
        emit, hit = self.stop.feed(text)
        r, c = self._split(emit)
        return r, c, hit

    def finish(self) -> tuple[str, str]:
        emit, hit = self.stop.feed(self.detok.flush())
        if not hit:
            emit += self.stop.flush()
        r, c = self._split(emit)
        if self.reasoning:
            r2, c2 = self.reasoning.flush()
            r, c = r + r2, c + c2
        return r, c


def make_choices(prompts: list[list[int]], params: list[SamplingParams], n: int, traceparent: str) -> list[Choice]:
    out = []
    base = uuid.uuid4().hex
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        for j in range(n):
            idx = i * n + j
            c = Choice(idx, prompt, p.with_updates(n=1, seed=child_seed(p.seed, j)), f"{base}-{idx}")
            c.trace.traceparent = traceparent
            out.append(c)
    return out


class ChoiceHooks(Protocol):
    """What the gateway observes of a running choice (metrics, trace events)."""

    def on_tokens(self, choice: "Choice", first_index: int, token_ids: list[int]) -> None: ...

    def on_done(self, choice: "Choice") -> None: ...


async def run_choice(mesh: MeshClient, model: str, tok: Tokenizer, choice: Choice, out: asyncio.Queue,
                     timeout: float, reasoning: Optional[ReasoningParser], hooks: Optional[ChoiceHooks] = None) -> None:
    """Drive one choice through the mesh, putting ``Delta``s on ``out``; never raises (errors
    become a Delta with ``error``), and always ends with a delta carrying finish_reason or error."""
    pipe = TextPipeline(tok, choice, reasoning)
    agen = mesh.stream(choice.request_id, model, choice.prompt_ids, choice.params, timeout, choice.trace)
    try:
        async for ev in agen:
            now = time.monotonic()
            if not choice.started.done():
                choice.started.set_result(True)
                choice.first_at = now
            else:
                choice.itls.append(now - choice.last_at)
            choice.last_at = now
            if hooks is not None:
                hooks.on_tokens(choice, len(choice.token_ids), ev.token_ids)
            r, c, stopped = pipe.add(ev.token_ids)
            if pipe.reasoning is not None and (r or pipe.reasoning.in_reasoning):
                choice.reasoning_tokens += len(ev.token_ids)
            choice.token_ids.extend(ev.token_ids)
            if ev.logprobs:
                choice.logprobs.extend(ev.logprobs)
            finish = "stop" if stopped else (ev.finish_reason if ev.finished else None)
            if finish is not None and not stopped:
                r2, c2 = pipe.finish()
                r, c = r + r2, c + c2
            choice.reasoning += r
            choice.text += c
            if r or c or ev.logprobs or finish or ev.token_ids:
                out.put_nowait(Delta(choice.index, r, c, ev.logprobs, ev.token_ids, finish))
            if finish is not None:
                choice.trace.stopped_by_text = stopped
                choice.finish_reason = finish
                choice.outcome = "ok"
                return
    except asyncio.CancelledError:
        choice.outcome = "aborted"
        raise
    except Exception as exc:  # noqa: BLE001 - the stream must end with an error, never hang
        if isinstance(exc, MeshError):
            choice.outcome = f"error:{exc.code.name.lower()}"
            err = mesh_error_to_api(exc)
        else:
            log.exception("choice %s failed", choice.request_id)
            choice.outcome = "error:internal"
            err = APIError(500, f"internal error: {type(exc).__name__}", "internal_error", code="internal_error")
        if not choice.started.done():
            choice.started.set_exception(err)
        out.put_nowait(Delta(choice.index, error=err))
    finally:
        await agen.aclose()
        if not choice.started.done():
            choice.started.set_result(False)
        if hooks is not None:
            hooks.on_done(choice)


def logprobs_chat(tok: Tokenizer, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = tok.decode([tid], skip_special_tokens=False)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(x.token_id, x.logprob), top_logprobs=[entry(t, v) for t, v in x.top]) for x in lps]}


def logprobs_completion(tok: Tokenizer, lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    tokens, offsets, pos = [], [], offset
    for x in lps:
        s = tok.decode([x.token_id], skip_special_tokens=False)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": [x.logprob for x in lps],
        "top_logprobs": [{tok.decode([t], skip_special_tokens=False): v for t, v in x.top} for x in lps],
        "text_offset": offsets,
    }
