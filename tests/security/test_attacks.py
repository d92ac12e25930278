"""The attacks of issue 26 on routing, requests and the front door, against the suite's mesh
(``conftest.mesh``), each tried without credentials, with a wrong mesh secret, and as a mesh member
under another identity, while users' requests stream."""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest

from pdmesh.rpc.auth import Identity
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import decode_pb2 as dpb
from pdmesh.v1 import decode_pb2_grpc as dgrpc
from pdmesh.v1 import kv_transfer_pb2 as kpb
from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as pgrpc
from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc
from services.cli import MODULES
from tests.faults.client import Outcome, Tally, nothing_lost
from tests.meshproc import Proc, free_port, gateway_books, list_workers, scrape
from tests.security.attacker import (EVIL_DECODE, EVIL_GATEWAY, HEADER_TIMEOUT, MAX_CONNECTIONS, NONE, WRONG,
                                    attempt, auth_headers, code, finish, greedy, users, workers)


class FakeDecode(dgrpc.DecodeServicer):
    """The attacker's decode worker: records every request routed to it (the prompts it would read)."""

    def __init__(self) -> None:
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        dgrpc.add_DecodeServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def Generate(self, request, context):
        self.calls += 1
        yield dpb.GenerateResponse(token_ids=[42], finished=True, finish_reason="stop")


def test_routing_cannot_be_taken_over(mesh, security_report):
    real = workers(mesh)
    decode = real[pb.ROLE_DECODE]
    fake = FakeDecode()
    forged = pb.WorkerInfo()
    forged.CopyFrom(decode)
    forged.address = fake.address
    newcomer = pb.WorkerInfo()
    newcomer.CopyFrom(forged)
    newcomer.worker_id = "decode-fake"
    huge = pb.WorkerInfo()
    huge.CopyFrom(newcomer)
    huge.model = "m" * (33 << 20)
    s = mesh.scheduler
    before = gateway_books(mesh.metrics_url("gateway"))
    load = users(mesh)
    tried = {}
    try:
        time.sleep(1.0)
        for cred in (NONE, WRONG, EVIL_DECODE):
            tried[f"register over {decode.worker_id} ({cred})"] = code(
                s, sgrpc.SchedulerStub, cred, lambda st: st.Register(spb.RegisterRequest(worker=forged), timeout=5))
        for cred in (NONE, WRONG):
            tried[f"register a fake decode worker ({cred})"] = code(
                s, sgrpc.SchedulerStub, cred, lambda st: st.Register(spb.RegisterRequest(worker=newcomer), timeout=5))
        tried["register a decode worker as a prefill identity"] = code(
            s, sgrpc.SchedulerStub, Identity("prefill", "decode-fake"),
            lambda st: st.Register(spb.RegisterRequest(worker=newcomer), timeout=5))
        for cred in (NONE, EVIL_DECODE):
            tried[f"heartbeat 'draining' for {decode.worker_id} ({cred})"] = code(
                s, sgrpc.SchedulerStub, cred,
                lambda st: st.Heartbeat(iter([spb.HeartbeatRequest(worker_id=decode.worker_id, draining=True)]), timeout=5))
            tried[f"deregister {decode.worker_id} ({cred})"] = code(
                s, sgrpc.SchedulerStub, cred, lambda st: st.Deregister(spb.DeregisterRequest(worker_id=decode.worker_id), timeout=5))
        for i in range(2):
            tried[f"33 MiB registration #{i + 1} (mesh member)"] = code(
                s, sgrpc.SchedulerStub, EVIL_DECODE, lambda st: st.Register(spb.RegisterRequest(worker=huge), timeout=30), 40)
        time.sleep(3.0)  # routes keep flowing, heartbeats keep beating
        after = {w.info.worker_id: w for w in list_workers(s)}
        health = httpx.get(mesh.base + "/health", timeout=5).status_code
    finally:
        leaked = finish(mesh, load, before)
        fake.server.stop(0)
    want = {k: "UNAUTHENTICATED" if (NONE in k or WRONG in k) else
            "RESOURCE_EXHAUSTED" if "MiB" in k else "PERMISSION_DENIED" for k in tried}
    assert tried == want
    assert set(after) == {w.worker_id for w in real.values()}, after  # no fake worker joined
    assert after[decode.worker_id].info.address == decode.address and not after[decode.worker_id].draining
    assert fake.calls == 0, "a user request reached the attacker's worker"
    assert health == 200
    security_report.add("routing_takeover", load.tally, faults_injected=len(tried), blocks_leaked=leaked,
                        refused=sum(v != "OK" for v in tried.values()), attempts=tried)


def test_abort_and_request_id_takeover_are_refused(mesh, security_report):
    prompt = list(range(900, 1200))  # 300 tokens: a 4-chunk pull (2 s)
    ref = greedy(mesh, prompt, 48)
    w = workers(mesh)
    p, d = w[pb.ROLE_PREFILL].address, w[pb.ROLE_DECODE].address
    before = gateway_books(mesh.metrics_url("gateway"))
    tally, victim, tried = Tally(), {}, {}
    seen_first = threading.Event()
    rid_box: list[str] = []

    def run_victim():
        tally.sent += 1
        with httpx.stream("POST", mesh.base + "/v1/completions", headers=auth_headers(), timeout=120,
                          json={"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            rid_box.append(r.headers["x-request-id"].split("-", 1)[1] + "-0")  # the internal id of choice 0
            text, done = "", False
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    assert "error" not in obj, obj
                    text += obj["choices"][0]["text"]
                    seen_first.set()
                done = done or line == "data: [DONE]"
            victim.update(text=text, done=done)

    th = threading.Thread(target=run_victim)
    th.start()
    try:
        assert seen_first.wait(60), "the victim's first token never came"
        rid = rid_box[0]
        # while its KV is leased on prefill (the pull takes 2 s): abort it there
        for cred in (NONE, WRONG, EVIL_GATEWAY):
            tried[f"Prefill.Abort of the victim ({cred})"] = code(
                p, pgrpc.PrefillStub, cred, lambda st: st.Abort(pb.AbortRequest(request_id=rid), timeout=5))
        # once decode holds it: abort it there, and take its request id over
        deadline = time.monotonic() + 10
        while True:
            res = attempt(d, dgrpc.DecodeStub, EVIL_GATEWAY, lambda st: st.Abort(pb.AbortRequest(request_id=rid), timeout=5))
            if res[0] != "OK" or time.monotonic() > deadline:
                break
            assert not res[1].found
            time.sleep(0.02)
        tried[f"Decode.Abort of the victim ({EVIL_GATEWAY})"] = res[0]
        tried[f"Decode.Abort of the victim ({NONE})"] = code(
            d, dgrpc.DecodeStub, NONE, lambda st: st.Abort(pb.AbortRequest(request_id=rid), timeout=5))
        steal = dpb.GenerateRequest(request_id=rid, prompt_token_ids=[1, 2, 3], first_token_id=4,
                                    params=pb.SamplingParams(max_tokens=4), kv=pb.KVDescriptor(request_id=rid))
        for cred in (NONE, EVIL_GATEWAY):
            tried[f"Decode.Generate reusing the victim's id ({cred})"] = code(
                d, dgrpc.DecodeStub, cred, lambda st: st.Generate(steal, timeout=5))
    finally:
        th.join(120)
    tally.add(Outcome(
        "ok" if victim.get("done") else "error", 200, "length", victim.get("text", "")))
    assert victim.get("done") and victim["text"] == ref, (victim, ref)
    assert tried == {k: "UNAUTHENTICATED" if (NONE in k or WRONG in k) else
                     "ALREADY_EXISTS" if "reusing" in k else "PERMISSION_DENIED" for k in tried}, tried
    leaked = nothing_lost(mesh.scheduler, mesh.metrics_url("gateway"), tally, before, expect_workers=2)
    security_report.add("abort_and_id_takeover", tally, faults_injected=len(tried), blocks_leaked=leaked,
                        refused=sum(v != "OK" for v in tried.values()), attempts=tried)


def test_kv_and_requests_only_for_their_roles(mesh, security_report):
    w = workers(mesh)
    p, d = w[pb.ROLE_PREFILL].address, w[pb.ROLE_DECODE].address
    forged = pb.KVDescriptor(request_id="someone-else", worker_id=w[pb.ROLE_PREFILL].worker_id, address=p,
                             transport="grpc", block_ids=[1, 2, 3], num_tokens=40)
    before = gateway_books(mesh.metrics_url("gateway"))
    load = users(mesh)
    tried = {}
    try:
        pull = lambda st: st.Pull(kpb.PullRequest(request_id="someone-else", block_ids=[1, 2, 3]), timeout=5)  # noqa: E731
        for cred in (NONE, WRONG, EVIL_GATEWAY):
            tried[f"KVTransfer.Pull ({cred})"] = code(p, kgrpc.KVTransferStub, cred, pull)
        tried[f"KVTransfer.GetIpcHandle ({EVIL_GATEWAY})"] = code(
            p, kgrpc.KVTransferStub, EVIL_GATEWAY, lambda st: st.GetIpcHandle(kpb.IpcHandleRequest(), timeout=5))
        gen = dpb.GenerateRequest(request_id="x-0", prompt_token_ids=list(range(40)), first_token_id=7,
                                  params=pb.SamplingParams(max_tokens=8), kv=forged)
        for cred in (NONE, WRONG, EVIL_DECODE):
            tried[f"Decode.Generate with a forged descriptor ({cred})"] = code(d, dgrpc.DecodeStub, cred, lambda st: st.Generate(gen, timeout=5))
        tried[f"Prefill.Prefill ({EVIL_DECODE})"] = code(
            p, pgrpc.PrefillStub, EVIL_DECODE, lambda st: st.Prefill(ppb.PrefillRequest(request_id="x", prompt_token_ids=[1]), timeout=5))
        tried[f"Prefill.Release ({NONE})"] = code(
            p, pgrpc.PrefillStub, NONE, lambda st: st.Release(ppb.ReleaseRequest(request_id="someone-else"), timeout=5))
        time.sleep(1.0)
    finally:
        leaked = finish(mesh, load, before)
    assert tried == {k: "UNAUTHENTICATED" if (NONE in k or WRONG in k) else "PERMISSION_DENIED" for k in tried}, tried
    security_report.add("kv_and_roles", load.tally, faults_injected=len(tried), blocks_leaked=leaked,
                        refused=sum(v != "OK" for v in tried.values()), attempts=tried)


def test_oversized_messages_are_refused_before_they_are_buffered(mesh, security_report):
    w = workers(mesh)
    rss = lambda role: scrape(f"http://127.0.0.1:{w[role].metrics_port}/metrics")["process_resident_memory_bytes"]  # noqa: E731
    base = {r: rss(r) for r in (pb.ROLE_PREFILL, pb.ROLE_DECODE)}
    ids = list(range(55 * 2**20 // 5))  # ~55 MiB of token ids
    big_prefill = ppb.PrefillRequest(request_id="big", prompt_token_ids=[2**30] * len(ids))
    big_generate = dpb.GenerateRequest(request_id="big-0", prompt_token_ids=[2**30] * len(ids))
    before = gateway_books(mesh.metrics_url("gateway"))
    load = users(mesh)
    tried = {}
    try:
        for cred in (NONE, EVIL_GATEWAY):
            tried[f"55 MiB Prefill ({cred})"] = code(w[pb.ROLE_PREFILL].address, pgrpc.PrefillStub, cred,
                                                     lambda st: st.Prefill(big_prefill, timeout=60), 90)
            tried[f"55 MiB Generate ({cred})"] = code(w[pb.ROLE_DECODE].address, dgrpc.DecodeStub, cred,
                                                      lambda st: st.Generate(big_generate, timeout=60), 90)
        grown = {pb.Role.Name(r): round((rss(r) - base[r]) / 2**20, 1) for r in base}
    finally:
        leaked = finish(mesh, load, before)
    assert set(tried.values()) == {"RESOURCE_EXHAUSTED"}, tried
    assert all(mb < 48 for mb in grown.values()), grown  # never buffered: a 55 MiB message would cost GBs as a list
    security_report.add("oversized_messages", load.tally, faults_injected=len(tried), blocks_leaked=leaked,
                        refused=len(tried), attempts=tried, rss_growth_mb=grown)


def test_slowloris_is_cut_off_and_real_clients_are_served(mesh, security_report):
    import socket

    gw_metrics = mesh.metrics_url("gateway")
    long_ref = greedy(mesh, list(range(1500, 1560)), 64)
    closed0 = scrape(gw_metrics)
    before = gateway_books(gw_metrics)
    tally = Tally()
    results: dict = {}

    def in_flight():  # a user stream whose headers were sent before the attack: never cut
        tally.sent += 1
        r = httpx.post(mesh.base + "/v1/completions", headers=auth_headers(), timeout=120,
                       json={"prompt": list(range(1500, 1560)), "max_tokens": 64, "temperature": 0, "ignore_eos": True})
        results["in_flight"] = r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    th = threading.Thread(target=in_flight)
    th.start()
    time.sleep(0.3)
    slow, n = [], 300
    t0 = time.monotonic()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", mesh.port), timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        slow.append(s)
    time.sleep(0.3)
    fds_under_attack = scrape(gw_metrics)["process_open_fds"]
    # a real client connecting now is served: the oldest slow connection makes room for it
    t = time.monotonic()
    r = httpx.post(mesh.base + "/v1/completions", headers=auth_headers(), timeout=60,
                   json={"prompt": "The sky is", "max_tokens": 4, "temperature": 0})
    tally.sent += 1
    tally.add(Outcome("ok" if r.status_code == 200 else "error",
                                                                               r.status_code))
    new_client_s = time.monotonic() - t
    # every slow connection is closed by the gateway within the header timeout (+ slack)
    for s in slow:
        s.settimeout(max(0.1, t0 + HEADER_TIMEOUT + 3.0 - time.monotonic()))
        try:
            assert s.recv(1) == b"", "a slow connection got data instead of being closed"
        except (ConnectionResetError, BrokenPipeError):
            pass
        except socket.timeout:
            pytest.fail(f"a slow connection was still open {time.monotonic() - t0:.1f}s after the attack began")
        finally:
            s.close()
    cut_within = time.monotonic() - t0
    th.join(120)
    tally.add(Outcome(
        "ok" if results["in_flight"][0] == 200 else "error", results["in_flight"][0]))
    after = scrape(gw_metrics)
    closed = {k: after.get(f'pdmesh:http_connections_closed_total{{reason="{k}"}}', 0) -
              closed0.get(f'pdmesh:http_connections_closed_total{{reason="{k}"}}', 0) for k in ("over_limit", "header_timeout")}
    assert results["in_flight"] == (200, long_ref), results
    assert r.status_code == 200, r.text
    assert closed["over_limit"] >= n - MAX_CONNECTIONS and closed["over_limit"] + closed["header_timeout"] >= n, closed
    assert fds_under_attack < MAX_CONNECTIONS + 200, fds_under_attack
    log = mesh.procs["gateway"].log_path.read_text()
    assert "closed client connection" in log and "--header-timeout" in log and "--max-connections" in log
    leaked = nothing_lost(mesh.scheduler, gw_metrics, tally, before, expect_workers=2)
    security_report.add("slowloris", tally, faults_injected=n, blocks_leaked=leaked, slow_connections=n,
                        closed_over_limit=int(closed["over_limit"]), closed_header_timeout=int(closed["header_timeout"]),
                        all_cut_within_s=round(cut_within, 1), new_client_served_in_s=round(new_client_s, 2),
                        gateway_open_fds_under_attack=int(fds_under_attack))


@pytest.mark.parametrize("role", ["scheduler", "gateway", "prefill"])
def test_services_refuse_to_start_without_credentials(tmp_path, role, monkeypatch):
    monkeypatch.delenv("PDMESH_MESH_SECRET", raising=False)
    args = ["--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port", "-1"]
    if role == "gateway":
        args += ["--grpc-port", "-1"]
    p = Proc([sys.executable, "-m", MODULES[role], *args], tmp_path / f"{role}.log")
    assert p.p.wait(60) == 2, p.tail()
    p.stop()
    lines = p.log_path.read_text().strip().splitlines()
    assert "internal gRPC calls would be unauthenticated" in lines[-1] and "--insecure-internal" in lines[-1], lines
    if role == "scheduler":  # explicitly insecure: it starts, and says so loudly
        p = Proc([sys.executable, "-m", MODULES[role], *args, "--insecure-internal"], tmp_path / "insecure.log")
        try:
            p.wait_log("READY scheduler", 60)
            assert "INSECURE: --insecure-internal" in p.log_path.read_text()
        finally:
            assert p.stop() == 0


def test_a_request_aborted_by_its_owner_ends_with_an_error_event(mesh, security_report):
    """Streams always end: an Abort that reaches the decode worker (from the request's own gateway)
    ends the client's stream with an error event at once, never a silent stall."""
    import socket

    d = workers(mesh)[pb.ROLE_DECODE].address
    owner = Identity("gateway", f"gateway@{socket.gethostname()}:{mesh.port}")  # as the gateway names itself
    before = gateway_books(mesh.metrics_url("gateway"))
    tally, seen, result = Tally(), threading.Event(), {}
    rid_box: list[str] = []

    def run():
        tally.sent += 1
        with httpx.stream("POST", mesh.base + "/v1/completions", headers=auth_headers(), timeout=120,
                          json={"prompt": list(range(600, 640)), "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                                "stream": True}) as r:
            rid_box.append(r.headers["x-request-id"].split("-", 1)[1] + "-0")
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        result["error"] = obj["error"]
                    elif obj["choices"][0]["text"]:
                        seen.set()
                    result["finish"] = result.get("finish") or obj.get("choices", [{}])[0].get("finish_reason")
                result["done"] = line == "data: [DONE]" or result.get("done", False)
        result["ended_at"] = time.monotonic()

    th = threading.Thread(target=run)
    th.start()
    assert seen.wait(60)
    time.sleep(0.5)  # decoding on the decode worker
    t = time.monotonic()
    status, resp = attempt(d, dgrpc.DecodeStub, owner, lambda st: st.Abort(pb.AbortRequest(request_id=rid_box[0]), timeout=5))
    th.join(30)
    assert status == "OK" and resp.found, (status, resp)
    assert result.get("error") and not result.get("finish"), result  # an error event, never a finish_reason
    assert result["ended_at"] - t < 5, result["ended_at"] - t
    tally.add(Outcome("error", 200, None, ""))
    leaked = nothing_lost(mesh.scheduler, mesh.metrics_url("gateway"), tally, before, expect_workers=2)
    security_report.add("abort_ends_stream", tally, faults_injected=1, blocks_leaked=leaked,
                        stream_ended_after_abort_s=round(result["ended_at"] - t, 2))
