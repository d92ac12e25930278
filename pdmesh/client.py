"""A small typed client for the public gRPC API (``pdmesh.v1.Inference``), asyncio and blocking.

    from pdmesh.client import InferenceClient
    with InferenceClient("127.0.0.1:50050") as c:
        for msg in c.chat([{"role": "user", "content": "Hi!"}], max_tokens=32, temperature=0):
            print(msg.text, end="", flush=True)

Messages are ``pdmesh.v1.InferenceResponse`` (text/reasoning deltas, token ids, optional logprobs,
finish reason per sample; usage on the last message). Sampling keywords are the fields of
``pdmesh.v1.SamplingOptions``; an unknown keyword raises TypeError. Errors are ``grpc.RpcError``
with the statuses documented in protos/pdmesh/v1/inference.proto.
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
    opts = ipb.SamplingOptions(**{k: v for k, v in kw.items() if v is not None})
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


def chat_request(messages: Sequence[dict], model: str, chat_template_kwargs: Optional[dict] = None,
                 **sampling: Any) -> ipb.ChatRequest:
    import json

    return ipb.ChatRequest(model=model, messages=[ipb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
                           sampling=sampling_options(**sampling),
                           chat_template_kwargs={k: json.dumps(v) for k, v in (chat_template_kwargs or {}).items()})


@dataclass
class Result:
    """A whole answer, collected from the stream (sample 0 unless ``index``)."""

    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: Optional[ipb.Usage] = None


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
    return r


class _Base:
    def __init__(self, api_key: Optional[str], timeout: float) -> None:
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout


class InferenceClient(_Base):
    """Blocking client."""

    def __init__(self, target: str, api_key: Optional[str] = None, timeout: float = 600.0) -> None:
        super().__init__(api_key, timeout)
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = igrpc.InferenceStub(self.channel)

    def generate(self, prompt: Prompt, model: str = "", **sampling: Any) -> Iterator[ipb.InferenceResponse]:
        return self.stub.Generate(generate_request(prompt, model, **sampling), timeout=self.timeout, metadata=self.metadata)

    def chat(self, messages: Sequence[dict], model: str = "", chat_template_kwargs: Optional[dict] = None,
             **sampling: Any) -> Iterator[ipb.InferenceResponse]:
        return self.stub.Chat(chat_request(messages, model, chat_template_kwargs, **sampling), timeout=self.timeout,
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

    def __init__(self, target: str, api_key: Optional[str] = None, timeout: float = 600.0) -> None:
        super().__init__(api_key, timeout)
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = igrpc.InferenceStub(self.channel)

    async def generate(self, prompt: Prompt, model: str = "", **sampling: Any) -> AsyncIterator[ipb.InferenceResponse]:
        call = self.stub.Generate(generate_request(prompt, model, **sampling), timeout=self.timeout, metadata=self.metadata)
        try:
            async for m in call:
                yield m
        finally:
            call.cancel()

    async def chat(self, messages: Sequence[dict], model: str = "", chat_template_kwargs: Optional[dict] = None,
                   **sampling: Any) -> AsyncIterator[ipb.InferenceResponse]:
        call = self.stub.Chat(chat_request(messages, model, chat_template_kwargs, **sampling), timeout=self.timeout,
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
