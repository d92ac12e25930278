"""``pdmesh up`` as a user runs it: failures before anything starts (one line naming the flag),
per-role worker flags with shell quoting, every listener printed, metrics labels that carry the
real ports, the API key and the mesh secret kept off command lines, stop-string ends counted as
finished, a crashed worker restarted while the rest keep serving."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.meshproc import Mesh, free_port, scrape, wait_http

KEY = "sk-up-test-4f1c9e"


def up(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "up", "--port", str(free_port()), "--grpc-port",
                           str(free_port()), "--metrics-port", str(free_port()), "--scheduler-port", str(free_port()),
                           "--scheduler-metrics-port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=timeout)


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - another server that says it is healthy
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):  # noqa: D102
        pass


def test_a_port_held_by_another_server_fails_fast_in_one_line():
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        t0 = time.monotonic()
        p = up("--port", str(port))
        assert p.returncode == 2, p.stdout + p.stderr
        assert p.stderr.strip().splitlines() == [
            f"pdmesh up: port {port} (--port) is in use by another process (Address already in use); stop it or choose another --port"]
        assert "pdmesh is up" not in p.stdout and "READY" not in p.stdout  # nothing was started
        assert time.monotonic() - t0 < 30
        p = up("--scheduler-metrics-port", str(port))
        assert p.returncode == 2 and f"port {port} (--scheduler-metrics-port) is in use" in p.stderr
    finally:
        srv.shutdown()


@pytest.mark.parametrize("args,expect", [
    (["--model", "/no/such/model"], "pdmesh up: --model /no/such/model: model '/no/such/model' is neither a directory"),
    (["--model", "qwen3-8b", "--load-format", "dummy", "--tokenizer", "/no/tok"],
     "pdmesh up: --tokenizer /no/tok: no such file or directory"),
    (["--decode-args", "--max-num-seqs '4"], "pdmesh up: --decode-args \"--max-num-seqs '4\": No closing quotation"),
    (["--prefill-devices", "0"], "pdmesh up: --prefill-devices: no GPU is visible on this host"),
    (["--prefill", "1", "--decode", "0"], "pdmesh up: --prefill: need --prefill >= 1 and --decode >= 1"),
    (["--metrics-port", "9999", "--grpc-port", "9999"], "pdmesh up: --metrics-port and --grpc-port are both 9999"),
])
def test_bad_flags_fail_before_any_process_starts(args, expect):
    p = up(*args)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expect), p.stderr
    assert "READY" not in p.stdout


@pytest.fixture(scope="module")
def upmesh(tmp_path_factory, embedded_dir):
    m = Mesh(tmp_path_factory.mktemp("up"), env={"PDMESH_API_KEY": KEY}, worker_args="--warmup on",
             extra=["--prefill-args", "--num-kv-blocks 40 --worker-id 'prefill one'", "--decode-args", "--num-kv-blocks 56"])
    yield m
    assert m.stop() == 0, m.proc.tail()
    assert m.service_pids() == []


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_role_args_reach_their_workers_with_shell_quoting(upmesh):
    ws = {w.info.role: w for w in upmesh.workers()}
    assert ws[1].info.worker_id == "prefill one" and ws[1].info.total_blocks == 40
    assert ws[2].info.total_blocks == 56 and ws[2].info.worker_id == f"decode-{ws[2].info.address.replace(':', '-')}"


def test_every_listener_is_printed_and_metrics_carry_the_real_ports(upmesh):
    log = upmesh.proc.log_path.read_text()
    assert f"pdmesh is up: {upmesh.base}/v1 (1 prefill, 1 decode, 0 colocated)" in log
    table = log[log.index("pdmesh is up"):].splitlines()[1:5]
    rows = {line.split()[0]: line for line in table}
    assert set(rows) == {"scheduler", "prefill-0", "decode-0", "gateway"}
    assert f"gRPC 127.0.0.1:{upmesh.grpc_port}" in rows["gateway"] and f"{upmesh.metrics_port}/metrics" in rows["gateway"]
    assert f"127.0.0.1:{upmesh.sched_port}" in rows["scheduler"] and f"{upmesh.sched_metrics_port}/metrics" in rows["scheduler"]
    for w in upmesh.workers():
        row = rows["prefill-0" if w.info.role == 1 else "decode-0"]
        assert w.info.address in row and "cpu" in row
        url = f"http://127.0.0.1:{w.info.metrics_port}/metrics"
        assert url in row
        page = httpx.get(url, timeout=5).text
        assert f'instance="{w.info.worker_id}"' in page


def test_workers_warm_up_before_they_report_ready(upmesh):
    log = upmesh.proc.log_path.read_text()
    for role in ("prefill", "decode"):
        lines = [x for x in log.splitlines() if f" {role}[" in x]
        done = next(i for i, x in enumerate(lines) if "warm-up done" in x)
        assert done < next(i for i, x in enumerate(lines) if "registered with scheduler" in x)
    assert log.index("warm-up done") < log.index("pdmesh is up")


def test_api_key_from_the_environment_never_on_a_command_line(upmesh):
    r = httpx.post(upmesh.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 401
    r = httpx.post(upmesh.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    pids = upmesh.service_pids() + [upmesh.proc.p.pid]
    assert len(pids) == 5
    for pid in pids:
        assert KEY not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


def _decode_metrics(mesh) -> dict:
    w = next(w for w in mesh.workers() if w.info.role == 2)
    return scrape(f"http://127.0.0.1:{w.info.metrics_port}/metrics")


def test_a_stop_string_end_counts_as_finished_not_aborted(upmesh):
    body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    full = httpx.post(upmesh.base + "/v1/completions", json=body, headers=_auth(), timeout=60).json()["choices"][0]["text"]
    first = httpx.post(upmesh.base + "/v1/completions", json=dict(body, max_tokens=1), headers=_auth(),
                       timeout=60).json()["choices"][0]["text"]
    words = full[len(first):].split()
    stop = words[len(words) // 2]  # produced by the decode worker, well after the first token
    before = _decode_metrics(upmesh)
    r = httpx.post(upmesh.base + "/v1/completions", json=dict(body, stop=[stop]), headers=_auth(), timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == full[:full.index(stop)]
    upmesh.wait_idle()
    after = _decode_metrics(upmesh)
    key = 'pdmesh:request_success_total{finished_reason="stop"}'
    assert after.get(key, 0) == before.get(key, 0) + 1
    assert after.get("pdmesh:num_aborted_requests_total", 0) == before.get("pdmesh:num_aborted_requests_total", 0)


def test_the_mesh_secret_is_random_private_and_never_on_a_command_line(upmesh, tmp_path):
    from services.up import UpConfig, _mesh_secret_file

    made = []
    for d in (tmp_path / "a", tmp_path / "b"):
        d.mkdir()
        made.append(Path(_mesh_secret_file(UpConfig(), d)))
    texts = [p.read_text().strip() for p in made]
    assert texts[0] != texts[1] and all(len(t) == 64 and int(t, 16) >= 0 for t in texts)  # 256 random bits each
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in made)
    secret = Path(upmesh.proc.p.args[upmesh.proc.p.args.index("--mesh-secret-file") + 1]).read_text().strip()
    for pid in upmesh.service_pids() + [upmesh.proc.p.pid]:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert secret not in cmd and ("--mesh-secret-file" in cmd or pid == upmesh.proc.p.pid)


def test_a_crashed_worker_is_restarted_while_the_rest_keep_serving(upmesh):
    """Last in this module: it changes the mesh's processes."""
    decode = next(w for w in upmesh.workers() if w.info.role == 2)
    pids = set(upmesh.service_pids())
    victim = next(p for p in pids if "--port 0" in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                  and "services.decode" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"))
    import os
    import signal

    os.kill(victim, signal.SIGKILL)
    upmesh.proc.wait_log("decode-0 exited with code -9; restarting it in 1s (the rest keep serving)", 30)
    upmesh.proc.wait_log("pdmesh up: decode-0 is back", 120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the new one registered, the dead one left routing (3 s without heartbeats)
        ids = [w.info.worker_id for w in upmesh.workers() if w.info.role == 2]
        if ids and decode.info.worker_id not in ids:
            break
        time.sleep(0.5)
    assert ids and decode.info.worker_id not in ids, ids
    wait_http(upmesh.base + "/health", upmesh.proc)
    r = httpx.post(upmesh.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    survivors = set(upmesh.service_pids())
    assert pids - {victim} <= survivors and len(survivors) == len(pids)  # the others never restarted
