"""The gateway's one request path, shared by the HTTP API and the gRPC API.

Lifecycle of a request
----------------------
``admit(body, kind)``: validation (``parse_request``: 400 naming the field) -> model check (404) ->
chat template / tokenization -> context-length check (400 ``context_length_exceeded``, before any
KV exists) -> readiness (503) -> backpressure (429).  ``launch(admitted, traceparent)``: every
choice runs through the mesh concurrently, its text through its ``TextPipeline``, deltas on one
queue.  ``end(run)``: exactly once, however the request ended — choices cancelled (which aborts
them on decode and prefill and frees their KV) or done, books closed (in flight, outcome, span).
A front end only turns deltas into its own shapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from pdmesh.engine.sequence import SamplingParams
from pdmesh.metrics import ServiceMetrics, watch_event_loop
from pdmesh.models.generation import GenerationDefaults
from pdmesh.openai.errors import APIError
from pdmesh.openai.protocol import OpenAIRequest, RequestPolicy, finalize_max_tokens, parse_request
from pdmesh.openai.reasoning import ReasoningParser
from pdmesh.openai.responses import usage
from pdmesh.openai.stream import TextPipeline
from pdmesh.openai.tool_parsers import make_extractor
from pdmesh.openai.tools import render_messages
from pdmesh.rpc.auth import BaseAuthenticator
from pdmesh.rpc.channels import ChannelPool
from pdmesh.rpc.server import channel_options
from pdmesh.rpc.tls import PLAINTEXT, TlsConfig
from pdmesh.telemetry import Telemetry, TracingConfig
from pdmesh.tokenizer import Tokenizer
from pdmesh.v1 import common_pb2 as pb
from services.gateway.choices import Choice, make_choices, run_choice
from services.gateway.config import GatewayConfig
from services.gateway.mesh_client import MeshClient

log = logging.getLogger("gateway")


@dataclass
class Admitted:
    """A validated request that passed every check: its prompts' token ids and final params."""

    req: OpenAIRequest
    prompts: list[list[int]]
    params: list[SamplingParams]


@dataclass
class Launched:
    """A request whose choices are running in the mesh; ``Gateway.end`` must follow, once."""

    req: OpenAIRequest
    rid: str
    choices: list[Choice]
    tasks: list[asyncio.Task]
    queue: asyncio.Queue
    span: Any
    traceparent: str


class Gateway:
    def __init__(self, cfg: GatewayConfig, tokenizer: Tokenizer, served_name: str, max_model_len: int,
                 tel: Optional[Telemetry] = None, tls: TlsConfig = PLAINTEXT,
                 generation: Optional[GenerationDefaults] = None, auth: Optional[BaseAuthenticator] = None) -> None:
        generation = generation or GenerationDefaults()
        self.cfg = cfg
        self.tel = tel or Telemetry(TracingConfig(tracing="off"), "gateway")
        self.tok = tokenizer
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.api_keys = cfg.api_keys()
        self.mesh = MeshClient(cfg.scheduler, route_timeout=cfg.route_timeout,
                               channels=ChannelPool(tls, auth, options=channel_options(cfg.keepalive)),
                               stream_idle_timeout=cfg.stream_idle_timeout)
        self.policy = RequestPolicy(max_model_len, cfg.max_n, cfg.max_stop, vocab_size=tokenizer.vocab_size,
                                    sampling_defaults=dict(generation.sampling), tool_call_parser=cfg.tool_call_parser,
                                    enable_auto_tool_choice=cfg.enable_auto_tool_choice)
        if generation.sampling:
            log.info("sampling defaults from %s: %s", generation.source, generation.sampling)
        self.inflight = 0
        self.ready = False
        self.draining = False
        self.created = int(time.time())
        vocab = tokenizer.hf.get_vocab()
        mode = cfg.reasoning_parser
        self.reasoning = mode == "think" or (mode == "auto" and "<think>" in vocab and "</think>" in vocab)
        self._tasks: list[asyncio.Task] = []
        self.metrics = ServiceMetrics(served_name, "gateway", f"{cfg.host}:{cfg.port}")

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

    # ------------------------------------------------------------------ the request path
    def admit(self, body: dict[str, Any], kind: str) -> Admitted:
        """Validation through backpressure, for HTTP and gRPC alike; raises APIError."""
        req = parse_request(body, kind, self.policy)  # type: ignore[arg-type]
        if req.ignored_fields:
            log.warning("ignored unknown request fields: %s", ", ".join(sorted(req.ignored_fields)))
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
        return Admitted(req, prompts, params)

    def _prompt_ids(self, req: OpenAIRequest) -> list[list[int]]:
        if req.kind == "chat":
            assert req.messages is not None
            messages, tools = render_messages(req.messages, req.tools, self.tok.hf.chat_template, self.cfg.tool_call_parser)
            try:
                return [self.tok.apply_chat_template(messages, req.add_generation_prompt, tools=tools,
                                                     continue_final_message=req.continue_final_message,
                                                     add_special_tokens=req.add_special_tokens, **req.chat_template_kwargs)]
            except Exception as exc:  # noqa: BLE001 - template errors are the client's
                raise APIError(400, f"chat template failed: {exc}", param="messages") from None
        assert req.prompts is not None
        return [self.tok.encode(p, req.add_special_tokens) if isinstance(p, str) else list(p) for p in req.prompts]

    def _echo(self, req: OpenAIRequest, i: int, prompt: list[int]) -> str:
        """The text that leads choice answers of prompt ``i`` when ``echo`` is set."""
        if not req.echo:
            return ""
        if req.kind == "chat":
            last = req.messages[-1] if req.messages else None
            return last["content"] or "" if last is not None and last["role"] == "assistant" else ""
        p = req.prompts[i] if req.prompts is not None else prompt
        return p if isinstance(p, str) else self.tok.decode(prompt, skip_special_tokens=False)

    def _reasoning_parser(self, prompt_ids: list[int]) -> Optional[ReasoningParser]:
        if not self.reasoning:
            return None
        tail = self.tok.decode(prompt_ids[-8:], skip_special_tokens=False).rstrip()
        return ReasoningParser(in_reasoning=tail.endswith("<think>"))

    def launch(self, adm: Admitted, incoming: Optional[str]) -> Launched:
        """Start every choice of an admitted request; ``end`` must follow, exactly once."""
        req, prompts, params = adm.req, adm.prompts, adm.params
        op = "chat" if req.kind == "chat" else "text_completion"
        span = self.tel.start(f"{op} {self.served_name}", incoming, attributes={
            "gen_ai.operation.name": op, "gen_ai.system": "pdmesh", "gen_ai.request.model": self.served_name,
            "gen_ai.request.max_tokens": params[0].max_tokens, "gen_ai.request.temperature": req.params.temperature,
            "gen_ai.request.top_p": req.params.top_p, "gen_ai.request.choice.count": req.params.n})
        if self.tel.cfg.trace_include_text:
            span.set_attribute("gen_ai.prompt", json.dumps(req.messages if req.kind == "chat" else req.prompts))
        traceparent = self.tel.traceparent(span, incoming)
        choices = make_choices(prompts, params, req.params.n, traceparent, lambda i, p: self._echo(req, i, p))
        queue: asyncio.Queue = asyncio.Queue()
        self.inflight += 1
        self.metrics.set("num_requests_running", self.inflight)
        tasks = []
        for c in choices:
            c.span = span
            pipe = TextPipeline(self.tok, c.prompt_ids, c.params, self._reasoning_parser(c.prompt_ids),
                                make_extractor(req.tools, self.cfg.tool_call_parser))
            tasks.append(asyncio.create_task(run_choice(self.mesh, self.served_name, c, pipe, queue,
                                                        self.cfg.request_timeout, self)))
        rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + choices[0].request_id.split("-")[0]
        return Launched(req, rid, choices, tasks, queue, span, traceparent)

    async def end(self, run: Launched) -> None:
        """Every request ends here once: choices cancelled (aborting them in the mesh) or done."""
        for t in run.tasks:
            t.cancel()
        try:  # the caller may itself be cancelled (client gone): the books are kept regardless
            await asyncio.shield(asyncio.gather(*run.tasks, return_exceptions=True))
        finally:
            self._close_books(run)

    def usage(self, run: Launched) -> dict[str, Any]:
        return usage(c.out for c in run.choices)

    # ------------------------------------------------------------------ books
    def rejected(self, err: APIError) -> APIError:
        """Count a request refused before it reached the mesh (the gateway's books:
        received = rejected + finished{ok, error, aborted})."""
        self.metrics.inc("requests_rejected_total", status=str(err.status))
        return err

    def on_tokens(self, c: Choice, first_index: int, token_ids: list[int]) -> None:
        for k, t in enumerate(token_ids):
            self.tel.token_event(c.span, first_index + k, **{"gen_ai.token.id": t, "pdmesh.choice": c.index})

    def on_done(self, c: Choice) -> None:
        """Metrics of one finished choice (client view)."""
        m = self.metrics
        if c.outcome == "aborted":
            m.inc("num_aborted_requests_total")
            return
        if c.outcome != "ok":
            m.inc("request_failure_total", reason=c.outcome.removeprefix("error:") or "unknown")
            return
        n = len(c.out.token_ids)
        m.inc("request_success_total", finished_reason=c.out.finish_reason or "stop")
        m.observe("time_to_first_token_seconds", c.first_at - c.arrival)
        m.observe("e2e_request_latency_seconds", c.last_at - c.arrival)
        if n > 1:
            m.observe("time_per_output_token_seconds", (c.last_at - c.first_at) / (n - 1))
        m.observe_many("inter_token_latency_seconds", c.itls)
        m.observe("request_prompt_tokens", len(c.prompt_ids))
        m.observe("request_generation_tokens", n)
        m.inc("prompt_tokens_total", len(c.prompt_ids))
        m.inc("generation_tokens_total", n)
        if c.trace.transport and c.trace.transfer_outcome == pb.TRANSFER_PULLED:  # a recomputed prompt moved no KV
            m.inc("kv_transfer_bytes_total", c.trace.transfer_bytes, transport=c.trace.transport)
            m.observe("kv_transfer_seconds", c.trace.transfer_seconds, transport=c.trace.transport)

    def _close_books(self, run: Launched) -> None:
        self.inflight -= 1
        self.metrics.set("num_requests_running", self.inflight)
        outcomes = {c.outcome.split(":")[0] for c in run.choices}
        self.metrics.inc("requests_finished_total", outcome="error" if "error" in outcomes else
                         "aborted" if outcomes - {"ok"} else "ok")  # '' : cancelled before it ran
        choices, span = run.choices, run.span
        span.set_attributes({
            "gen_ai.response.id": run.rid,
            "gen_ai.response.finish_reasons": [c.out.finish_reason or c.outcome or "error" for c in choices],
            "gen_ai.usage.input_tokens": sum(len(c.prompt_ids) for c in choices if c.index % run.req.params.n == 0),
            "gen_ai.usage.output_tokens": sum(len(c.out.token_ids) for c in choices),
            "pdmesh.kv.transport": choices[0].trace.transport, "pdmesh.prefill_worker": choices[0].trace.prefill_worker,
            "pdmesh.decode_worker": choices[0].trace.decode_worker,
        })
        if self.tel.cfg.trace_include_text:
            span.set_attribute("gen_ai.completion", json.dumps([c.out.reasoning + c.out.text for c in choices]))
        if any(c.outcome.startswith("error") for c in choices):
            span.set_attribute("error.type", next(c.outcome for c in choices if c.outcome.startswith("error")))
        span.end()

    # ------------------------------------------------------------------ tokenizer routes
    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt or chat messages -> token ids."""
        model = body.get("model")
        if model is not None and model != self.served_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        if "messages" in body:
            req = parse_request({k: v for k, v in body.items() if k in ("messages", "tools", "tool_choice",
                                 "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                                 "add_special_tokens")}, "chat", self.policy)
            ids = self._prompt_ids(req)[0]
        elif isinstance(body.get("prompt"), str):
            add = body.get("add_special_tokens", True)
            if not isinstance(add, bool):
                raise APIError(400, "'add_special_tokens' must be a boolean", param="add_special_tokens")
            ids = self.tok.encode(body["prompt"], add)
        else:
            raise APIError(400, "give 'prompt' (a string) or 'messages'", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "'tokens' must be a list of token ids", param="tokens")
        if any(t < 0 or t >= self.tok.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in [0, {self.tok.vocab_size})", param="tokens")
        return {"prompt": self.tok.decode(ids, skip_special_tokens=False)}
