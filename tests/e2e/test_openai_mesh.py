"""The mesh as 4+ processes (scheduler, prefill, decode, gateway) with the embedded default model,
driven by the official ``openai`` client."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest
import torch

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 2+2?"]


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=mesh.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def hf_chat_greedy(smol_hf, tokenizer, question, n=32):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    out = smol_hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    return tokenizer.decode(out), len(ids), len(out)


def test_models_and_health(client, mesh):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(mesh.base + "/health").json()["ready"] is True


def test_chat_greedy_equals_transformers(client, smol_hf, tokenizer):
    for q in QUESTIONS:
        ref, n_prompt, n_out = hf_chat_greedy(smol_hf, tokenizer, q)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=32, temperature=0)
        assert r.choices[0].message.content == ref
        assert r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == n_out
        assert r.usage.total_tokens == n_prompt + n_out
        assert r.choices[0].finish_reason == ("length" if n_out == 32 else "stop")


def test_chat_streaming_matches_non_streaming(client):
    q = [{"role": "user", "content": "Write one sentence about rivers."}]
    full = client.chat.completions.create(model=MODEL, messages=q, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=q, max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0


def test_raw_sse_format(mesh):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", mesh.base + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_completions_and_usage(client, tokenizer):
    prompt = "The three primary colors are"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt)) and r.usage.completion_tokens <= 12
    s = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text
    # a repeated prompt is served from the prefix cache (reported as cached tokens) when long enough
    long_prompt = "Here is a list of fruits: " + ", ".join(["apple", "banana", "cherry", "grape"] * 12)
    client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_n2_and_seed_reproducibility(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a fun fact."}], max_tokens=20,
              temperature=1.0, seed=42, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    one = client.chat.completions.create(**dict(kw, n=1))
    assert a.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once, not per choice
    assert a.choices[0].message.content == one.choices[0].message.content  # choice 0 uses the request's seed
    s = client.chat.completions.create(**kw, stream=True)
    texts = {0: "", 1: ""}
    for c in s:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in a.choices]


def test_stop_strings(client):
    q = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    base = client.chat.completions.create(model=MODEL, messages=q, max_tokens=40, temperature=0).choices[0].message.content
    word = base.split(",")[2].strip()
    r = client.chat.completions.create(model=MODEL, messages=q, max_tokens=40, temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop" and word not in r.choices[0].message.content
    assert base.startswith(r.choices[0].message.content)
    s = client.chat.completions.create(model=MODEL, messages=q, max_tokens=40, temperature=0, stop=[word], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == r.choices[0].message.content


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-5  # greedy: the top one


def test_concurrent_streams_and_cancellations_leave_kv_at_baseline(client, mesh):
    base = mesh.wait_idle()
    totals = {w.info.worker_id: w.load.total_blocks for w in base}

    def full(i):
        s = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Story number {i}:"}],
                                           max_tokens=24, temperature=0.8, seed=i, stream=True)
        return sum(1 for c in s if c.choices and c.choices[0].finish_reason)

    with cf.ThreadPoolExecutor(32) as ex:
        assert list(ex.map(full, range(32))) == [1] * 32

    def cut(i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Write a long essay about topic {i}."}],
                "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", mesh.base + "/v1/chat/completions", json=body, timeout=60) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 2 + (i % 5) * 2:
                    break  # close mid-stream
        return True

    with cf.ThreadPoolExecutor(20) as ex:
        assert all(ex.map(cut, range(20)))
    after = mesh.wait_idle(timeout=30)
    assert {w.info.worker_id: w.load.free_blocks for w in after} == totals


@pytest.mark.parametrize("body,status,param", [
    (b"{bad json", 400, None),
    (b"[]", 400, None),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 1000}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 50}).encode(), 400, "stop"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a\u0000b"}]}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": "nope"}).encode(), 400, "messages"),
    (b"\xc3\x28", 400, None),
    (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
])
def test_bad_inputs_get_status_and_error_body(mesh, client, body, status, param):
    r = httpx.post(mesh.base + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok?"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_context_length_and_body_limit(mesh):
    long = "word " * 9000
    r = httpx.post(mesh.base + "/v1/completions", json={"model": MODEL, "prompt": long, "max_tokens": 10}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(mesh.base + "/v1/completions", json={"model": MODEL, "prompt": "x" * (5 << 20)}, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    mesh.wait_idle()


def test_trace_context_travels_to_prefill_and_decode(mesh):
    import time

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = httpx.post(mesh.base + "/v1/chat/completions", timeout=60,
                   headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Tell me about owls."}],
                         "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["traceparent"].split("-")[1] == trace
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = mesh.proc.log_path.read_text(errors="replace")
        lines = [line for line in log.splitlines() if f"trace={trace}" in line]
        if any(" prefill[" in line for line in lines) and any(" decode[" in line and "via grpc" in line for line in lines):
            return
        time.sleep(0.2)
    raise AssertionError("trace id not seen on both prefill and decode")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples, name, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, val) in ls for k, val in labels.items()))


def test_metrics_agree_with_a_known_workload(mesh, client, tokenizer):
    from pdmesh.metrics import exported_names
    from tests.meshproc import wait_until

    mesh.wait_idle()
    ws = mesh.workers()
    urls = {"gateway": f"http://127.0.0.1:{mesh.metrics_port}/metrics",
            "scheduler": f"http://127.0.0.1:{mesh.sched_metrics_port}/metrics"}
    for w in ws:
        urls["prefill" if w.info.role == 1 else "decode"] = f"http://127.0.0.1:{w.info.metrics_port}/metrics"
    before = {k: scrape(u) for k, u in urls.items()}

    prompts, gen = 0, 0
    for i in range(3):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Say something {i}"}],
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        prompts, gen = prompts + r.usage.prompt_tokens, gen + r.usage.completion_tokens
    for i in range(2):
        s = client.completions.create(model=MODEL, prompt=f"Counting: {i}, {i + 1},", max_tokens=5, temperature=0,
                                      stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage = [c.usage for c in s if c.usage][-1]
        prompts, gen = prompts + usage.prompt_tokens, gen + usage.completion_tokens
    cut_prompts = 0
    for i in range(2):
        msgs = [{"role": "user", "content": f"Write a very long story {i}."}]
        cut_prompts += len(tokenizer.apply_chat_template(msgs))
        body = {"model": MODEL, "messages": msgs, "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", mesh.base + "/v1/chat/completions", json=body, timeout=60) as resp:
            for n, _ in enumerate(line for line in resp.iter_lines() if line):
                if n >= 6:
                    break
    mesh.wait_idle()

    def settled():  # worker gauges refresh every 0.5 s
        got = {k: scrape(u) for k, u in urls.items()}
        gauges = ("pdmesh:num_requests_running", "pdmesh:kv_blocks_held_for_transfer", "pdmesh:kv_cache_usage_perc")
        return got if all(total(got[r], g) == 0 for r in ("prefill", "decode") for g in gauges) else None

    after = wait_until(settled, 10, "worker gauges back at zero")

    def d(role, name, **labels):
        return total(after[role], name, **labels) - total(before[role], name, **labels)

    assert gen == 28
    assert d("gateway", "pdmesh:request_success_total") == 5
    assert d("gateway", "pdmesh:prompt_tokens_total") == prompts
    assert d("gateway", "pdmesh:generation_tokens_total") == gen
    assert d("gateway", "pdmesh:num_aborted_requests_total") == 2
    assert d("gateway", "pdmesh:request_failure_total") == 0
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens", "request_generation_tokens"):
        assert d("gateway", f"pdmesh:{h}_count") == 5, h
    assert d("gateway", "pdmesh:time_per_output_token_seconds_count") == 5
    assert d("gateway", "pdmesh:kv_transfer_bytes_total", transport="grpc") > 0
    assert d("gateway", "pdmesh:kv_transfer_seconds_count", transport="grpc") == 5
    # prefill saw every prompt (the cut ones too) and produced each first token
    assert d("prefill", "pdmesh:prompt_tokens_total") == prompts + cut_prompts
    assert d("prefill", "pdmesh:request_queue_time_seconds_count") == 7
    assert d("prefill", "pdmesh:generation_tokens_total") == 7
    assert d("prefill", "pdmesh:prefix_cache_queries_total") >= prompts + cut_prompts
    # decode generated the rest, finished five, lost two to the client
    assert d("decode", "pdmesh:request_success_total", finished_reason="length") == 5
    assert d("decode", "pdmesh:num_aborted_requests_total") == 2
    assert d("decode", "pdmesh:generation_tokens_total") >= gen - 5
    # decode pulled KV for all seven (the cut ones too); the gateway reports the five it finished
    assert d("decode", "pdmesh:kv_transfer_seconds_count", transport="grpc") == 7
    assert d("decode", "pdmesh:kv_transfer_bytes_total", transport="grpc") > d("gateway", "pdmesh:kv_transfer_bytes_total", transport="grpc")
    for role in ("prefill", "decode"):
        assert total(after[role], "pdmesh:num_requests_running") == 0
        assert total(after[role], "pdmesh:kv_blocks_held_for_transfer") == 0
        assert total(after[role], "pdmesh:kv_cache_usage_perc") == 0
    for w in ws:  # a worker's instance label is its registered id (the bound port, not 0)
        role = "prefill" if w.info.role == 1 else "decode"
        assert {dict(ls).get("instance") for n, ls in after[role] if n.startswith("pdmesh:")} == {w.info.worker_id}
    names = exported_names()
    for role, samples in after.items():
        assert {n for n, _ in samples} <= names, (role, {n for n, _ in samples} - names)


def test_pdmesh_health_command_against_the_live_mesh(mesh):
    import subprocess
    import sys

    def health(*args):
        return subprocess.run([sys.executable, "-m", "services.cli", "health", *args], capture_output=True, timeout=60).returncode

    assert health("--http", mesh.base + "/health") == 0
    assert health("--grpc", mesh.scheduler) == 0
    for w in mesh.workers():
        assert health("--grpc", w.info.address, "--service", "pdmesh.v1.Decode" if w.info.role == 2 else "pdmesh.v1.Prefill") == 0
    assert health("--grpc", mesh.scheduler, "--service", "no.such.Service") == 1
