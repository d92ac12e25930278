"""Colocated workers ('pdmesh both', one engine prefills and decodes) in a mesh with a
prefill/decode pair: short prompts stay on the colocated worker, long ones are disaggregated
(conditional disaggregation), tokens are the same either way, and every exit frees the KV."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest

from services.cli import up
from tests.meshproc import Services, scrape, wait_idle

MODEL = "SmolLM2-135M-Instruct"
SHORT = "The capital of France is"
LONG = ("Rivers carry water from mountains to the sea, shaping valleys, feeding farms and giving towns a reason to "
        "exist. Over thousands of years they move their beds, leave rich soil behind and cut canyons through rock. "
        "Tell me about the longest river")
THRESHOLD = 48  # --colocate-below-tokens: SHORT is below it, LONG above


@pytest.fixture(scope="module")
def svc(tmp_path_factory, embedded_dir):
    s = Services(tmp_path_factory.mktemp("colocated"), prefill=1, decode=1, both=1,
                 scheduler_args=("--colocate-below-tokens", str(THRESHOLD)))
    s.wait_workers(1, 1, both=1)
    yield s
    rcs = s.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


@pytest.fixture(scope="module")
def client(svc):
    return openai.OpenAI(base_url=svc.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def counters(svc, name: str) -> dict[str, float]:
    m = scrape(svc.metrics_url(name))
    return {k: m.get("pdmesh:" + k, 0.0) for k in (
        "prompt_tokens_total", "generation_tokens_total", "request_prefill_time_seconds_count",
        "request_prefill_time_seconds_sum",
        'engine_step_seconds_count{kind="decode"}', "kv_transfer_bytes_total")}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def complete(client, prompt: str, n: int = 16, stream: bool = False):
    if stream:
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    return r.choices[0].text, r.usage


def test_short_prompts_colocated_long_prompts_disaggregated(svc, client):
    before = {n: counters(svc, n) for n in ("prefill-0", "decode-0", "both-0")}
    text, usage = complete(client, SHORT)
    text_s, usage_s = complete(client, SHORT, stream=True)
    assert text_s == text and usage_s.completion_tokens == usage.completion_tokens == 16
    assert usage.prompt_tokens < THRESHOLD
    long_text, long_usage = complete(client, LONG)
    assert long_usage.prompt_tokens >= THRESHOLD and long_usage.completion_tokens == 16
    d = {n: delta(counters(svc, n), before[n]) for n in before}
    # both short requests: prompt computed and decoded on the colocated worker, no KV moved
    assert d["both-0"]["prompt_tokens_total"] == 2 * usage.prompt_tokens
    assert d["both-0"]["request_prefill_time_seconds_count"] == 2
    assert d["both-0"]["request_prefill_time_seconds_sum"] > 0  # from scheduling to the first token
    assert d["both-0"]["generation_tokens_total"] == 32
    assert d["both-0"]['engine_step_seconds_count{kind="decode"}'] >= 15
    assert d["both-0"]["kv_transfer_bytes_total"] == 0
    # the long one: prefill computed the prompt and token 0, decode pulled the KV and made the rest
    assert d["prefill-0"]["prompt_tokens_total"] == long_usage.prompt_tokens
    assert d["prefill-0"]["generation_tokens_total"] == 1
    assert d["decode-0"]["generation_tokens_total"] == 15
    assert d["decode-0"]["kv_transfer_bytes_total"] > 0
    wait_idle(svc.scheduler, expect=3)


def test_colocated_concurrency_and_disconnect_free_kv(svc, client):
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: complete(client, f"{SHORT} {'very ' * i}", n=12, stream=i % 2 == 0), range(8)))
    assert all(u.completion_tokens == 12 for _, u in results)
    # a client that goes away mid-stream: the colocated request is aborted and its KV freed
    body = {"model": MODEL, "prompt": SHORT, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", svc.base + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 3:
                break
    wait_idle(svc.scheduler, timeout=20, expect=3)


def test_without_the_colocated_worker_short_prompts_disaggregate_with_identical_tokens(svc, client):
    colocated, _ = complete(client, SHORT, n=24)
    assert svc.stop("both-0") == 0  # drains, deregisters, exits 0
    svc.wait_workers(1, 1, both=0)
    before = counters(svc, "prefill-0")
    disaggregated, usage = complete(client, SHORT, n=24)
    assert delta(counters(svc, "prefill-0"), before)["prompt_tokens_total"] == usage.prompt_tokens
    assert disaggregated == colocated
    wait_idle(svc.scheduler, expect=2)


def test_up_refuses_meshes_without_a_way_to_serve():
    for argv in (["--prefill", "0", "--decode", "1"], ["--prefill", "1", "--decode", "0"],
                 ["--prefill", "0", "--decode", "0"], ["--colocated", "-1"]):
        assert up(argv) == 2, argv


def test_a_mesh_of_colocated_workers_alone_is_ready_and_serves(svc, client):
    svc.start("both-0")
    svc.stop("prefill-0")
    svc.stop("decode-0")
    svc.wait_workers(0, 0, both=1)
    deadline = time.monotonic() + 10
    while httpx.get(svc.base + "/health").status_code != 200:  # the gateway re-reads the workers every 0.5 s
        assert time.monotonic() < deadline, "gateway not ready with only a colocated worker"
        time.sleep(0.2)
    text, usage = complete(client, LONG, n=8)
    assert usage.completion_tokens == 8 and usage.prompt_tokens >= THRESHOLD  # long prompt, no pair: colocated
    assert counters(svc, "both-0")["prompt_tokens_total"] == usage.prompt_tokens
    wait_idle(svc.scheduler, expect=1)
