"""Gateway behaviour that needs its own processes: API keys, no workers (503), 2 prefill + 2 decode."""

from __future__ import annotations

import concurrent.futures as cf
import sys

import httpx
import openai
import pytest

from tests.meshproc import Mesh, Proc, free_port, mesh_secret_file, wait_http, wait_until

MODEL = "SmolLM2-135M-Instruct"


def gateway(tmp_path, scheduler: str, *extra: str) -> tuple[Proc, str]:
    port = free_port()
    p = Proc([sys.executable, "-m", "services.gateway", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "-1",
              "--metrics-port", str(free_port()), "--scheduler", scheduler, "--mesh-secret-file", mesh_secret_file(tmp_path),
              *extra], tmp_path / f"gw-{port}.log")
    return p, f"http://127.0.0.1:{port}"


def test_no_workers_gives_503_and_health_503(tmp_path, embedded_dir):
    proc, base = gateway(tmp_path, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        proc.wait_log("READY gateway")  # listening
        assert httpx.get(base + "/health").status_code == 503
        r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_workers" and r.headers["retry-after"]
    finally:
        assert proc.stop() == 0


@pytest.fixture(scope="module")
def mesh22(tmp_path_factory, embedded_dir):
    m = Mesh(tmp_path_factory.mktemp("mesh22"), prefill=2, decode=2)
    yield m
    assert m.stop() == 0, m.proc.tail()
    assert m.service_pids() == []


def test_api_key_required_everywhere_but_health(tmp_path, mesh22):
    proc, base = gateway(tmp_path, mesh22.scheduler, "--api-key", "s3cret")
    try:
        wait_http(base + "/health", proc)
        for path in ("/v1/models",):
            assert httpx.get(base + path).status_code == 401
            assert httpx.get(base + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        assert proc.stop() == 0


def test_two_prefill_two_decode_spread_and_same_tokens(mesh22):
    ws = mesh22.workers()
    assert sorted(w.info.role for w in ws) == [1, 1, 2, 2]
    before = {w.info.worker_id: w.load.requests_total for w in ws}
    client = openai.OpenAI(base_url=mesh22.base + "/v1", api_key="x", max_retries=0, timeout=120)

    def ask(i):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                              max_tokens=16, temperature=0).choices[0].message.content

    with cf.ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(ask, range(16)))
    assert len(set(answers)) == 1  # whichever pair served it, the same greedy tokens
    def counted():  # heartbeats carry the counters to the scheduler
        after = {w.info.worker_id: w.load.requests_total for w in mesh22.workers()}
        return after if all(after[w] > before[w] for w in after) else None

    wait_until(counted, 10, f"every worker's requests_total above {before}")
    mesh22.wait_idle()
