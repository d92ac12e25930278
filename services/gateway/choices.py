"""Running the choices of a request through the mesh: each choice's token events go through its
``TextPipeline`` (pdmesh.openai.stream) and come out as ``Delta``s on the request's queue."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from pdmesh.engine.llm import child_seed
from pdmesh.engine.sequence import SamplingParams
from pdmesh.openai.errors import APIError
from pdmesh.openai.stream import ChoiceOutput, Delta, TextPipeline
from services.gateway.errors import mesh_error_to_api
from services.gateway.mesh_client import MeshClient, MeshError, RequestTrace

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """One of a request's n samples (for each prompt), as it runs through the mesh."""

    out: ChoiceOutput
    params: SamplingParams
    request_id: str
    trace: RequestTrace = field(default_factory=RequestTrace)
    started: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    arrival: float = field(default_factory=time.monotonic)
    first_at: float = 0.0
    last_at: float = 0.0
    itls: list[float] = field(default_factory=list)
    outcome: str = ""
    """'ok', 'aborted' or 'error:<grpc code>' once the choice ended."""
    span: Any = None
    """The request's gateway span (token events go there)."""

    @property
    def index(self) -> int:
        return self.out.index

    @property
    def prompt_ids(self) -> list[int]:
        return self.out.prompt_ids


def make_choices(prompts: list[list[int]], params: list[SamplingParams], n: int, traceparent: str,
                 echo: Callable[[int, list[int]], str]) -> list[Choice]:
    """n choices per prompt (child seeds), indexed prompt-major; ``echo(i, prompt)`` their lead text."""
    out = []
    base = uuid.uuid4().hex
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        lead = echo(i, prompt)
        for j in range(n):
            idx = i * n + j
            c = Choice(ChoiceOutput(idx, prompt, echo=lead), p.with_updates(n=1, seed=child_seed(p.seed, j)), f"{base}-{idx}")
            c.trace.traceparent = traceparent
            out.append(c)
    return out


class ChoiceHooks(Protocol):
    """What the gateway observes of a running choice (metrics, trace events)."""

    def on_tokens(self, choice: "Choice", first_index: int, token_ids: list[int]) -> None: ...

    def on_done(self, choice: "Choice") -> None: ...


async def run_choice(mesh: MeshClient, model: str, choice: Choice, pipe: TextPipeline, out: asyncio.Queue,
                     timeout: float, hooks: Optional[ChoiceHooks] = None) -> None:
    """Drive one choice through the mesh, putting ``Delta``s on ``out``; never raises (errors
    become a Delta with ``error``), and always ends with a delta carrying finish_reason or error."""
    res = choice.out
    agen = mesh.stream(choice.request_id, model, res.prompt_ids, choice.params, timeout, choice.trace)
    try:
        async for ev in agen:
            now = time.monotonic()
            first = not choice.started.done()
            if first:
                choice.started.set_result(True)
                choice.first_at = now
                res.num_cached_tokens = choice.trace.num_cached_tokens
                if choice.params.prompt_logprobs is not None:
                    res.prompt_logprobs = ev.prompt_logprobs or []
            else:
                choice.itls.append(now - choice.last_at)
            choice.last_at = now
            d = Delta(res.index, logprobs=ev.logprobs, token_ids=ev.token_ids, first=first)
            # as vLLM: the token that stopped the request (EOS, a stop id) is not part of the text
            shown = ev.token_ids[:-1] if ev.finished and ev.finish_reason == "stop" and \
                not choice.params.include_stop_str_in_output else ev.token_ids
            cut = pipe.add(shown, d)
            stopped = cut is not None
            kept = ev.token_ids if cut is None else ev.token_ids[:cut]  # tokens past a stop string are not the choice's
            if len(kept) < len(ev.token_ids):
                d.token_ids = kept
                d.logprobs = ev.logprobs[:len(kept)] if ev.logprobs is not None else None
            if hooks is not None:
                hooks.on_tokens(choice, len(res.token_ids), kept)
            if pipe.reasoning is not None and (d.reasoning or pipe.reasoning.in_reasoning):
                res.reasoning_tokens += len(kept)
            res.token_ids.extend(kept)
            finish = "stop" if stopped else (ev.finish_reason if ev.finished else None)
            if finish is not None:
                choice.trace.stopped_by_text = stopped
                pipe.finish(d, stopped)
                res.finish_reason = finish
                d.finish_reason = finish
                if pipe.tools is not None:
                    res.tool_calls = list(pipe.tools.calls)
            res.add(d)
            out.put_nowait(d)
            if finish is not None:
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
        out.put_nowait(Delta(res.index, error=err))
    finally:
        await agen.aclose()
        if not choice.started.done():
            choice.started.set_result(False)
        if hooks is not None:
            hooks.on_done(choice)
