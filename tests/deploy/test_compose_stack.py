"""Deploy smoke test: the CPU image built with podman (deploy/podman/build.sh: a local Debian base,
offline from a wheelhouse), the compose file's cpu profile (scheduler, gateway, prefill and decode
workers) run by podman-compose on free host ports, then: every service's own health check, non-root
users, chat and completion through the OpenAI client and the public gRPC API, disaggregation seen
in the workers' metrics, a stream in flight surviving SIGTERM to the whole stack (drain within the
stop grace period), and nothing of the stack left on the host.

On a host without podman & co it skips, naming what is missing; `.ci/run` installs them and runs it
with --deploy=require, where anything missing fails."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from tests.deploy.podman import APT_PACKAGES, IMAGE, SERVICES, Stack, build_image, missing_prerequisites
from tests.meshproc import free_port, parse_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
DEFAULT_STOP_TIMEOUT = 10.0
"""Seconds podman (and docker) wait after SIGTERM when a service sets no stop_grace_period."""
DRAIN_TIMEOUT = 30.0
"""--drain-timeout of the compose file's services."""


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    missing = missing_prerequisites()
    if missing:
        msg = f"the deploy smoke test needs {', '.join(missing)} (Debian: apt-get install {APT_PACKAGES})"
        if request.config.getoption("--deploy") == "require":
            pytest.fail(msg)
        pytest.skip(msg + "; CI installs them and runs it with --deploy=require")
    logs = tmp_path_factory.mktemp("deploy")
    build_s = build_image(logs / "build.log")
    s = Stack(f"pdmesh-smoke-{os.getpid()}", free_port(), free_port(), free_port(), logs / "compose.log")
    try:
        t0 = time.monotonic()
        s.compose("up", "-d", "--no-build")
        healthy_s = s.wait_healthy()
        print(f"deploy: image built in {build_s:.0f}s; stack up in {time.monotonic() - t0:.0f}s "
              f"(healthy after {healthy_s:.0f}s)")
        yield s
    finally:
        try:
            s.compose("down", timeout=120)
        except Exception as exc:  # noqa: BLE001 - the test that stops the stack reports leftovers
            print(f"compose down: {exc}")


def openai_client(stack):
    import openai

    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def labels(text: str, name: str) -> list[dict]:
    """The label sets of metric ``name``'s samples."""
    from prometheus_client.parser import text_string_to_metric_families

    return [smp.labels for fam in text_string_to_metric_families(text) for smp in fam.samples if smp.name == name]


def test_services_run_as_their_own_pid_1_as_non_root(stack):
    image = stack.podman("image", "inspect", IMAGE, "--format", "{{json .Config.Healthcheck}}").stdout
    assert '"pdmesh","health"' in image.replace(" ", ""), image  # the image's own check survives the build
    for service, c in stack.containers().items():
        assert stack.podman("exec", c.name, "id", "-u").stdout.strip() == "10001", service
        # The service is PID 1: SIGTERM from the engine reaches its handler (drain), not a shell.
        pid1 = stack.podman("exec", c.name, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert "python" in pid1[0] and pid1[1].endswith("/pdmesh") and pid1[2] == service.split("-")[0], pid1
        assert stack.healthy(service), service


def test_chat_and_completion_answer(stack):
    from pdmesh.client import InferenceClient

    client = openai_client(stack)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in chat.choices[0].message.content, chat
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stream=True) if c.choices)
    assert streamed == chat.choices[0].message.content
    comp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in comp.choices[0].text, comp
    with InferenceClient(f"127.0.0.1:{stack.grpc_port}", timeout=120) as grpc_client:  # the public gRPC API port
        text = "".join(m.text for m in grpc_client.chat(QUESTION, max_tokens=24, temperature=0))
    assert text == chat.choices[0].message.content


def test_a_request_is_disaggregated_across_the_containers(stack):
    def scrape():
        pages = {s: stack.metrics(s) for s in ("prefill-cpu", "decode-cpu")}
        pages["gateway"] = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5).text  # published
        return pages

    before = scrape()
    r = openai_client(stack).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                                     extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 12
    time.sleep(1.2)  # worker gauges and counters refresh every 0.5 s
    after = scrape()

    def d(service, name):
        return parse_metrics(after[service]).get(name, 0.0) - parse_metrics(before[service]).get(name, 0.0)

    # The prefill container computed the prompt and the first token ...
    assert d("prefill-cpu", "pdmesh:request_prefill_time_seconds_count") == 1
    assert d("prefill-cpu", "pdmesh:prompt_tokens_total") == r.usage.prompt_tokens
    assert d("prefill-cpu", "pdmesh:generation_tokens_total") == 1
    # ... the decode container pulled its KV over the network (grpc) and generated the rest ...
    assert d("decode-cpu", 'pdmesh:kv_transfer_seconds_count{transport="grpc"}') == 1
    assert d("decode-cpu", 'pdmesh:kv_transfer_bytes_total{transport="grpc"}') > 0
    assert d("decode-cpu", "pdmesh:request_prefill_time_seconds_count") == 0
    assert d("decode-cpu", "pdmesh:generation_tokens_total") == 11
    assert d("decode-cpu", 'pdmesh:request_success_total{finished_reason="length"}') == 1
    # ... and the gateway, on its published metrics port, counted one request that moved KV.
    assert d("gateway", 'pdmesh:requests_finished_total{outcome="ok"}') == 1
    assert d("gateway", 'pdmesh:kv_transfer_bytes_total{transport="grpc"}') > 0
    # Every role serves one model name; a worker's instance label is its registered id (its port).
    for service, page in after.items():
        assert {ls["model_name"] for ls in labels(page, "pdmesh:prompt_tokens_total")} == {MODEL}, service
    for service, port in (("prefill-cpu", 50061), ("decode-cpu", 50071)):
        instances = {ls["instance"] for ls in labels(after[service], "pdmesh:prompt_tokens_total")}
        assert len(instances) == 1 and instances.pop().endswith(f"-{port}"), (service, instances)


def decode_step_seconds(stack) -> float:
    """Mean decode step time of the decode container, after a request of 16 tokens."""
    openai_client(stack).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0,
                                            extra_body={"ignore_eos": True})
    m = parse_metrics(stack.metrics("decode-cpu"))
    return m['pdmesh:engine_step_seconds_sum{kind="decode"}'] / m['pdmesh:engine_step_seconds_count{kind="decode"}']


def test_sigterm_drains_a_stream_in_flight_then_nothing_is_left(stack):
    # A stream long enough that, after SIGTERM, it outlives podman's default stop timeout (10 s) but
    # not the services' --drain-timeout (30 s): it finishes only if the stop grace period covers the drain.
    step = decode_step_seconds(stack)
    remaining = 18.0
    max_tokens = int(remaining / step) + 8
    chunks: list[tuple[float, str]] = []
    result: dict = {}

    def stream():
        try:
            s = openai_client(stack).completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            for c in s:
                if c.choices:
                    chunks.append((time.monotonic(), c.choices[0].text))
                    result["finish_reason"] = c.choices[0].finish_reason or result.get("finish_reason")
                if c.usage:
                    result["usage"] = c.usage
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 60
    while len(chunks) < 8 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(chunks) >= 8, result
    t_stop = time.monotonic()
    stack.compose("stop", timeout=120)  # SIGTERM to every container at once; SIGKILL after stop_grace_period
    stopped_s = time.monotonic() - t_stop
    t.join(timeout=60)
    assert not t.is_alive()

    assert "error" not in result, result
    assert result["usage"].completion_tokens == max_tokens and result["finish_reason"] == "length", result
    drained_s = chunks[-1][0] - t_stop
    assert DEFAULT_STOP_TIMEOUT < drained_s < DRAIN_TIMEOUT, (
        f"the stream ran {drained_s:.1f}s after SIGTERM (decode step {step * 1000:.0f} ms): the test needs "
        f"{DEFAULT_STOP_TIMEOUT:.0f}-{DRAIN_TIMEOUT:.0f}s")
    cs = stack.containers()
    assert set(cs) == set(SERVICES)
    for service, c in cs.items():
        assert (c.state, c.exit_code) == ("exited", 0), stack.logs(service)  # drained, not SIGKILLed (137)
    assert "SIGTERM: draining" in stack.logs("decode-cpu", tail=200)
    assert stopped_s < 40, stopped_s  # within the grace period

    stack.compose("down", timeout=120)
    assert stack.leftovers() == []
