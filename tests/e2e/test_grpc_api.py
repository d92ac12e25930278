"""The public gRPC API against a running mesh: streaming Generate and Chat, the same greedy output
as the HTTP API, cancellation freeing KV on both workers, each error status, reflection, health."""

from __future__ import annotations

import sys
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdmesh.client import AsyncInferenceClient, InferenceClient, collect
from tests.meshproc import Proc, free_port, mesh_secret_file

MODEL = "SmolLM2-135M-Instruct"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def grpc_client(mesh):
    with InferenceClient(f"127.0.0.1:{mesh.grpc_port}", timeout=120) as c:
        yield c


def test_chat_and_generate_equal_http(mesh, grpc_client):
    http = httpx.post(mesh.base + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MSGS, "max_tokens": 24, "temperature": 0}).json()
    msgs = list(grpc_client.chat(MSGS, model=MODEL, max_tokens=24, temperature=0))
    assert len(msgs) > 2  # streamed
    r = collect(msgs)
    assert r.text == http["choices"][0]["message"]["content"]
    assert r.finish_reason == http["choices"][0]["finish_reason"]
    assert r.usage.completion_tokens == http["usage"]["completion_tokens"] == len(r.token_ids)
    assert r.usage.prompt_tokens == http["usage"]["prompt_tokens"]
    comp = httpx.post(mesh.base + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "The sky is", "max_tokens": 10, "temperature": 0}).json()
    g = grpc_client.complete("The sky is", max_tokens=10, temperature=0)
    assert g.text == comp["choices"][0]["text"] and g.usage.prompt_tokens == comp["usage"]["prompt_tokens"]
    ids = grpc_client.complete([1, 504, 3575], max_tokens=5, temperature=0, logprobs=2)
    assert len(ids.token_ids) == 5


def test_generate_logprobs_n_and_async_client(mesh):
    import asyncio

    async def go():
        c = AsyncInferenceClient(f"127.0.0.1:{mesh.grpc_port}", timeout=120)
        try:
            msgs = [m async for m in c.generate("Once upon a time", max_tokens=6, temperature=1.0, seed=5, n=2, logprobs=1)]
            models = await c.list_models()
        finally:
            await c.close()
        return msgs, models

    msgs, models = asyncio.run(go())
    assert [m.id for m in models] == [MODEL] and models[0].max_model_len > 0
    assert {m.index for m in msgs if not m.HasField("usage")} == {0, 1}
    lps = [lp for m in msgs for lp in m.logprobs]
    assert lps and all(lp.logprob <= 0 and len(lp.top_token_ids) == 1 for lp in lps)
    assert msgs[-1].usage.completion_tokens == 12


def test_cancel_mid_stream_frees_kv_on_both_workers(mesh, grpc_client):
    mesh.wait_idle()
    call = grpc_client.generate("Write a long story about a dragon.", max_tokens=300, ignore_eos=True, temperature=0)
    got = 0
    for _ in call:
        got += 1
        if got == 4:
            call.cancel()
            break
    assert got == 4
    mesh.wait_idle(timeout=20)


@pytest.mark.parametrize("kw,code", [
    (dict(temperature=5.0), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(max_tokens=100000), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND),
    (dict(n=1000), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_error_statuses(grpc_client, kw, code):
    with pytest.raises(grpc.RpcError) as e:
        list(grpc_client.chat(MSGS, **kw))
    assert e.value.code() == code and e.value.details()


def test_context_length_is_invalid_argument(grpc_client):
    with pytest.raises(grpc.RpcError) as e:
        list(grpc_client.generate("word " * 9000, max_tokens=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in e.value.details()


def test_reflection_and_health(mesh):
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in resp.list_services_response.service}
        assert "pdmesh.v1.Inference" in names and "grpc.health.v1.Health" in names
        h = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "pdmesh.v1.Inference"):
            assert h.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def gateway_proc(tmp_path, scheduler: str, *extra: str) -> tuple[Proc, str, int]:
    port, gport = free_port(), free_port()
    p = Proc([sys.executable, "-m", "services.gateway", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(gport),
              "--metrics-port", "-1", "--scheduler", scheduler, "--mesh-secret-file", mesh_secret_file(tmp_path), *extra],
             tmp_path / f"gw-{port}.log")
    p.wait_log("READY gateway")  # printed once both the HTTP and the gRPC listener are up
    return p, f"http://127.0.0.1:{port}", gport


def test_unauthenticated_resource_exhausted_deadline(tmp_path, mesh):
    p, base, gport = gateway_proc(tmp_path, mesh.scheduler, "--api-key", "k3y", "--max-inflight", "1", "--request-timeout", "3")
    try:
        for _ in range(100):
            if httpx.get(base + "/health").status_code == 200:
                break
            time.sleep(0.1)
        target = f"127.0.0.1:{gport}"
        with pytest.raises(grpc.RpcError) as e:
            list(InferenceClient(target).chat(MSGS, max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            InferenceClient(target, api_key="wrong").list_models()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = InferenceClient(target, api_key="k3y", timeout=60)
        assert ok.complete("Hi", max_tokens=2).usage.completion_tokens == 2
        # one long request holds the only slot: the next gets RESOURCE_EXHAUSTED, and the long one
        # runs into the gateway's 3 s request deadline: DEADLINE_EXCEEDED
        outcome = {}

        def long_call():
            try:
                list(ok.generate("Tell me everything.", max_tokens=3000, ignore_eos=True))
            except grpc.RpcError as exc:
                outcome["long"] = exc.code()

        t = threading.Thread(target=long_call)
        t.start()
        time.sleep(1.0)
        with pytest.raises(grpc.RpcError) as e:
            ok.complete("Hi", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        t.join(60)
        assert outcome.get("long") == grpc.StatusCode.DEADLINE_EXCEEDED
        mesh.wait_idle(timeout=20)
    finally:
        assert p.stop() == 0


def test_unavailable_without_workers(tmp_path):
    p, base, gport = gateway_proc(tmp_path, f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(InferenceClient(f"127.0.0.1:{gport}").chat(MSGS, max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert st == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        assert p.stop() == 0
