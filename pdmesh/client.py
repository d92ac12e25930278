"""A small typed client for the public gRPC API (``pdmesh.v1.Inference``), asyncio and blocking.

    from pdmesh.client import InferenceClient
    with InferenceClient("127.0.0.1:50050") as c:
        for msg in c.chat([{"role": "user", "content": "Hi!"}], max_tokens=32, temperature=0):
            print(msg.text, end="", flush=True)

Messages are ``pdmesh.v1.InferenceResponse`` (text/reasoning deltas, token ids, optional logprobs,
tool-call deltas, finish reason per sample; usage on the last message). Sampling keywords are the
fields of ``pdmesh.v1.SamplingOptions`` (``structured_output`` as a dict, e.g. ``{"json_schema":
"..."}``); an unknown keyword raises TypeError. ``chat(..., tools=[{"name", "description",
"parameters": dict}], tool_choice="auto" | "required" | "none" | {"function": name})``. Errors are
``grpc.RpcError`` with the statuses documented in protos/pdmesh/v1/inference.proto. Pass
``root_certificates`` (PEM) to reach a gateway started with --ssl-certfile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Optional, Sequence, Union

import grpc

from pdmesh.rpc.server import CHANNEL_OPTIONS
from pdmesh.v1 import inference_pb2 as ipb
from pdmesh.v1 import inference_pb2_grpc as igrpc

Prompt = Union[str, Sequence[int]]


def sampling_options(**kw: Any) -> ipb.SamplingOptions:
    fields = set(ipb.SamplingOptions.DESCRIPTOR.fields_by_name)
    unknown = set(kw) - fields
    if unknown:
        raise TypeError(f"unknown sampling options {sorted(unknown)}; known: {sorted(fields)}")
    stop = kw.pop("stop", None)
    structured = kw.pop("structured_output", None)
    if isinstance(structured, dict):
        structured = ipb.StructuredOutput(**{k: (ipb.ChoiceList(choices=v) if k == "choice" else v)
                                             for k, v in structured.items()})
    opts = ipb.SamplingOptions(**{k: v for k, v in kw.items() if v is not None})
    if structured is not None:
        opts.structured_output.CopyFrom(structured)
    if stop:
        opts.stop.extend([stop] if isinstance(stop, str) else list(stop))
    return opts


def generate_request(prompt: Prompt, model: str, **sampling: Any) -> ipb.TextGenerationRequest:
    req = ipb.TextGenerationRequest(model=model, sampling=sampling_options(**sampling))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _message(m: dict) -> ipb.ChatMessage:
    calls = [ipb.ToolCall(id=c.get("id", ""), name=c["function"]["name"], arguments=c["function"].get("arguments", ""))
             for c in m.get("tool_calls") or ()]
    return ipb.ChatMessage(role=m["role"], content=m.get("content") or "", tool_calls=calls,
                           tool_call_id=m.get("tool_call_id", ""), name=m.get("name", ""))


def _tool_choice(choice: Union[str, dict, None]) -> Optional[ipb.ToolChoice]:
    if choice is None:
        return None
    if isinstance(choice, str):
        return ipb.ToolChoice(mode=choice)
    name = choice.get("function")
    return ipb.ToolChoice(function=name["name"] if isinstance(name, dict) else name)


def chat_request(messages: Sequence[dict], model: str, chat_template_kwargs: Optional[dict] = None,
                 tools: Optional[Sequence[dict]] = None, tool_choice: Union[str, dict, None] = None,
                 parallel_tool_calls: Optional[bool] = None, **sampling: Any) -> ipb.ChatRequest:
    import json

    req = ipb.ChatRequest(model=model, messages=[_message(m) for m in messages], sampling=sampling_options(**sampling),
                          chat_template_kwargs={k: json.dumps(v) for k, v in (chat_template_kwargs or {}).items()},
                          tools=[ipb.Tool(name=t["name"], description=t.get("description", ""), strict=t.get("strict", False),
                                          parameters=json.dumps(t["parameters"]) if t.get("parameters") is not None else "")
                                 for t in tools or ()])
    choice = _tool_choice(tool_choice)
    if choice is not None:
        req.tool_choice.CopyFrom(choice)
    if parallel_tool_calls is not None:
        req.parallel_tool_calls = parallel_tool_calls
    return req


@dataclass
class Result:
    """A whole answer, collected from the stream (sample 0 unless ``index``)."""

    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: Optional[ipb.Usage] = None
    tool_calls: list[ipb.ToolCall] = field(default_factory=list)
    """Complete calls (deltas joined): id, name, arguments (JSON text)."""


def collect(messages, index: int = 0) -> Result:
    r = Result()
    for m in messages:
        if m.HasField("usage"):
            r.usage = m.usage
        elif m.index == index:
            r.text += m.text
            r.reasoning += m.reasoning_text
            r.token_ids.extend(m.token_ids)
            r.finish_reason = m.finish_reason or r.finish_reason
            for d in m.tool_calls:
                if d.index == len(r.tool_calls):
                    r.tool_calls.append(ipb.ToolCall(id=d.id, name=d.name))
                r.tool_calls[d.index].arguments += d.arguments
    return r


class _Base:
    def __init__(self, api_key: Optional[str], timeout: float) -> None:
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    @staticmethod
    def _channel(module: Any, target: str, root_certificates: Optional[bytes]) -> Any:
        if root_certificates is None:
            return module.insecure_channel(target, options=CHANNEL_OPTIONS)
        return module.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=CHANNEL_OPTIONS)


class InferenceClient(_Base):
    """Blocking client."""

    def __init__(self, target: str, api_key: Optional[str] = None, timeout: float = 600.0,
                 root_certificates: Optional[bytes] = None) -> None:
        super().__init__(api_key, timeout)
        self.channel = self._channel(grpc, target, root_certificates)
        self.stub = igrpc.InferenceStub(self.channel)

    def generate(self, prompt: Prompt, model: str = "", **sampling: Any) -> Iterator[ipb.InferenceResponse]:
        return self.stub.Generate(generate_request(prompt, model, **sampling), timeout=self.timeout, metadata=self.metadata)

    def chat(self, messages: Sequence[dict], model: str = "", chat_template_kwargs: Optional[dict] = None,
             **kw: Any) -> Iterator[ipb.InferenceResponse]:
        """``kw``: tools, tool_choice, parallel_tool_calls, and sampling options."""
        return self.stub.Chat(chat_request(messages, model, chat_template_kwargs, **kw), timeout=self.timeout,
                              metadata=self.metadata)

    def complete(self, prompt: Prompt, model: str = "", **sampling: Any) -> Result:
        return collect(self.generate(prompt, model, **sampling))

    def list_models(self) -> list[ipb.Model]:
        return list(self.stub.ListModels(ipb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata).models)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncInferenceClient(_Base):
    """asyncio client; breaking out of a stream (or cancelling its task) cancels the call."""

    def __init__(self, target: str, api_key: Optional[str] = None, timeout: float = 600.0,
                 root_certificates: Optional[bytes] = None) -> None:
        super().__init__(api_key, timeout)
        self.channel = self._channel(grpc.aio, target, root_certificates)
        self.stub = igrpc.InferenceStub(self.channel)

    async def generate(self, prompt: Prompt, model: str = "", **sampling: Any) -> AsyncIterator[ipb.InferenceResponse]:
        call = self.stub.Generate(generate_request(prompt, model, **sampling), timeout=self.timeout, metadata=self.metadata)
        try:
            async for m in call:
                yield m
        finally:
            call.cancel()

    async def chat(self, messages: Sequence[dict], model: str = "", chat_template_kwargs: Optional[dict] = None,
                   **kw: Any) -> AsyncIterator[ipb.InferenceResponse]:
        call = self.stub.Chat(chat_request(messages, model, chat_template_kwargs, **kw), timeout=self.timeout,
                              metadata=self.metadata)
        try:
            async for m in call:
                yield m
        finally:
            call.cancel()

    async def list_models(self) -> list[ipb.Model]:
        return list((await self.stub.ListModels(ipb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata)).models)

    async def close(self) -> None:
        await self.channel.close()
