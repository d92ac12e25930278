"""Start real mesh processes on 127.0.0.1 with free ports, bounded in time, and stop them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import grpc
import httpx

from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One child process with its log in a file; killed (process group) on stop."""

    def __init__(self, args: list[str], log: Path, env: Optional[dict] = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        full_env = dict(os.environ, **(env or {}))
        self.p = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=full_env)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self._log.close()
        return self.p.returncode

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_http(url: str, proc: Proc, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"process exited:\n{proc.tail()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready in {timeout}s:\n{proc.tail()}")


class Mesh:
    """``pdmesh up`` as a subprocess (it starts scheduler, workers and gateway as its children)."""

    def __init__(self, tmp: Path, prefill: int = 1, decode: int = 1, extra: Optional[list[str]] = None,
                 worker_args: str = "", env: Optional[dict] = None) -> None:
        self.port = free_port()
        self.sched_port = free_port()
        self.metrics_port = free_port()
        self.sched_metrics_port = free_port()
        self.grpc_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "services.cli", "up", "--port", str(self.port), "--scheduler-port",
                str(self.sched_port), "--metrics-port", str(self.metrics_port), "--scheduler-metrics-port",
                str(self.sched_metrics_port), "--grpc-port", str(self.grpc_port), "--prefill", str(prefill), "--decode", str(decode),
                "--worker-args", f"--cpu-threads 1 --kv-cache-memory 268435456 {worker_args}".strip(), *(extra or [])]
        self.proc = Proc(args, tmp / f"mesh-{self.port}.log", env)
        wait_http(self.base + "/health", self.proc)

    @property
    def scheduler(self) -> str:
        return f"127.0.0.1:{self.sched_port}"

    def workers(self) -> list[spb.WorkerStatus]:
        async def go():
            async with grpc.aio.insecure_channel(self.scheduler) as ch:
                return list((await sgrpc.SchedulerStub(ch).ListWorkers(spb.ListWorkersRequest(), timeout=5)).workers)

        return asyncio.run(go())

    def wait_idle(self, timeout: float = 15.0) -> list[spb.WorkerStatus]:
        """Until every worker reports all KV blocks free, nothing held, nothing running/waiting."""
        deadline = time.monotonic() + timeout
        ws: list = []
        while time.monotonic() < deadline:
            ws = self.workers()
            if ws and all(w.load.free_blocks == w.load.total_blocks and w.load.held_blocks == 0 and w.load.running == 0
                          and w.load.waiting == 0 and w.load.waiting_for_kv == 0 and w.load.inflight == 0 for w in ws):
                return ws
            time.sleep(0.25)
        raise AssertionError("KV not back at baseline: " + "; ".join(
            f"{w.info.worker_id}: free={w.load.free_blocks}/{w.load.total_blocks} held={w.load.held_blocks} "
            f"running={w.load.running} waiting={w.load.waiting} inflight={w.load.inflight}" for w in ws))

    def service_pids(self) -> list[int]:
        """Live processes of this mesh (found through /proc by their flags)."""
        marks = (f"127.0.0.1:{self.sched_port}", f"--port {self.sched_port}")
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "services." in cmd and any(m in cmd for m in marks):
                out.append(int(d.name))
        return out

    def stop(self) -> int:
        return self.proc.stop(signal.SIGTERM, timeout=90)


class OtlpReceiver:
    """An OTLP/gRPC trace receiver on 127.0.0.1 (tests and benchmarks): keeps (service, span)."""

    def __init__(self) -> None:
        import threading
        from concurrent import futures

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self

        class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with receiver.lock:
                    for rs in request.resource_spans:
                        svc = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                        for ss in rs.scope_spans:
                            receiver.spans.extend((svc, sp) for sp in ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.lock = threading.Lock()
        self.spans: list = []
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    @property
    def env(self) -> dict:
        """Environment that makes every service export here."""
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}

    def stop(self) -> None:
        self.server.stop(0)
