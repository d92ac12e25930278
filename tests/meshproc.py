"""Start real mesh processes on 127.0.0.1 with free ports, bounded in time, and stop them."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import grpc
import httpx

from pdmesh.rpc.auth import Identity, MeshSecretAuthenticator
from pdmesh.rpc.channels import open_channel
from pdmesh.rpc.tls import PLAINTEXT, TlsConfig
from pdmesh.v1 import scheduler_pb2 as spb
from services.cli import MODULES, STOP_ORDER
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc

MESH_SECRET = secrets.token_hex(32)
"""The mesh secret of every mesh this test process starts (as 'pdmesh up' makes one for its children)."""


def mesh_secret_file(directory: Path) -> str:
    """A file (mode 0600) in ``directory`` holding ``MESH_SECRET``: every service started by the
    tests gets it as ``--mesh-secret-file``."""
    path = directory / "mesh-secret"
    if not path.exists() or path.read_text().strip() != MESH_SECRET:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(MESH_SECRET + "\n")
    return str(path)


def mesh_auth(role: str = "gateway", ident: str = "test-client") -> MeshSecretAuthenticator:
    """Credentials of the test process on the mesh's internal APIs (by default: a gateway's)."""
    return MeshSecretAuthenticator(MESH_SECRET.encode(), lambda: Identity(role, ident))


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1 and never handed out before by this process: the kernel may give
    a just-closed port again, and two servers told the same port would clash."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


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

    def wait_log(self, text: str, timeout: float = 120.0) -> None:
        """Until ``text`` appears in this process's log (it exits or times out: an error with the tail)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_path.read_text(errors="replace"):
                return
            if not self.alive():
                raise RuntimeError(f"process exited before logging {text!r}:\n{self.tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"{text!r} not logged in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``cond()`` until it returns something truthy (returned), for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        time.sleep(interval)


def wait_http(url: str, proc: Proc, timeout: float = 240.0, others: tuple[Proc, ...] = ()) -> None:
    """Wait for ``url`` to answer 200; fail at once when ``proc`` or any of ``others`` (the services
    it needs) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in (proc, *others):
            if not p.alive():
                raise RuntimeError(f"process exited:\n{p.tail()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready in {timeout}s:\n{proc.tail()}")


def list_workers(scheduler: str, tls: TlsConfig = PLAINTEXT) -> list[spb.WorkerStatus]:
    """The scheduler's workers, asked as a gateway (with the mesh secret; with ``tls``, over TLS)."""
    async def go():
        async with open_channel(scheduler, tls, auth=mesh_auth()) as ch:
            return list((await sgrpc.SchedulerStub(ch).ListWorkers(spb.ListWorkersRequest(), timeout=5)).workers)

    return asyncio.run(go())


def _idle(w: spb.WorkerStatus) -> bool:
    ld = w.load
    return (ld.free_blocks == ld.total_blocks and ld.held_blocks == 0 and ld.running == 0 and ld.waiting == 0
            and ld.waiting_for_kv == 0 and ld.inflight == 0)


def wait_idle(scheduler: str, timeout: float = 15.0, expect: Optional[int] = None,
              tls: TlsConfig = PLAINTEXT) -> list[spb.WorkerStatus]:
    """Until every registered worker (``expect`` of them, when given) reports all KV blocks free,
    nothing held for transfer, nothing running, waiting or in flight.  The scheduler itself keeps no
    per-request state (routing is stateless), so the workers' reports are the whole picture."""
    deadline = time.monotonic() + timeout
    ws: list = []
    while time.monotonic() < deadline:
        try:
            ws = list_workers(scheduler, tls)
        except grpc.RpcError:
            ws = []
        if ws and (expect is None or len(ws) == expect) and all(_idle(w) for w in ws):
            return ws
        time.sleep(0.25)
    raise AssertionError(f"KV not back at baseline ({len(ws)} workers): " + "; ".join(
        f"{w.info.worker_id}: free={w.load.free_blocks}/{w.load.total_blocks} held={w.load.held_blocks} "
        f"running={w.load.running} waiting={w.load.waiting} waiting_for_kv={w.load.waiting_for_kv} "
        f"inflight={w.load.inflight}" for w in ws))


def scrape(url: str) -> dict[str, float]:
    """A /metrics page as {'name{label="v",...}': value} plus {name: sum over series}."""
    return parse_metrics(httpx.get(url, timeout=5).text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{label="v",...}': value} (without the model_name, role and instance
    labels) plus {name: sum over series}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(smp.labels.items())
                              if k not in ("model_name", "role", "instance"))
            out[f"{smp.name}{{{labels}}}"] = smp.value
            out[smp.name] = out.get(smp.name, 0.0) + smp.value
    return out


def gateway_books(metrics_url: str) -> dict[str, float]:
    """The gateway's own accounting: every request received is rejected, or reaches the mesh and
    ends ok, in error or aborted, exactly once."""
    m = scrape(metrics_url)
    g = lambda k: m.get("pdmesh:" + k, 0.0)  # noqa: E731
    return {"received": g("requests_received_total"), "rejected": g("requests_rejected_total"),
            "ok": g('requests_finished_total{outcome="ok"}'), "failed": g('requests_finished_total{outcome="error"}'),
            "aborted": g('requests_finished_total{outcome="aborted"}'), "running": g("num_requests_running")}


def process_vitals(metrics_url: str) -> dict[str, float]:
    m = scrape(metrics_url)
    return {"rss_mb": round(m.get("process_resident_memory_bytes", 0) / 2**20, 1), "fds": m.get("process_open_fds", 0),
            "tasks": m.get("pdmesh:asyncio_tasks", 0), "loop_lag_max_s": m.get("pdmesh:event_loop_lag_max_seconds", 0)}


class Services:
    """Scheduler, workers and gateway as separate processes the test controls one by one (kill,
    stop, restart on the same port), on 127.0.0.1 with free ports."""

    WORKER_ARGS = ["--cpu-threads", "1", "--kv-cache-memory", "268435456"]

    def __init__(self, tmp: Path, prefill: int = 1, decode: int = 1, worker_args: tuple = (),
                 gateway_args: tuple = (), scheduler_args: tuple = (), env: Optional[dict] = None,
                 role_args: Optional[dict[str, tuple]] = None, both: int = 0,
                 workers: tuple[tuple[str, tuple], ...] = (), mesh_secret: bool = True) -> None:
        """``workers``: more (name, extra flags) to start before the gateway, e.g. each on its own GPU.
        ``mesh_secret``: give every service ``--mesh-secret-file`` (False: their flags must give them
        TLS identities or --insecure-internal)."""
        self.tmp, self.env, self.mesh_secret = tmp, env, mesh_secret
        self.role_args = {k: list(v) for k, v in (role_args or {}).items()}
        self.worker_args, self.gateway_args, self.scheduler_args = list(worker_args), list(gateway_args), list(scheduler_args)
        self.procs: dict[str, Proc] = {}
        self.ports: dict[str, tuple[int, int]] = {}
        self.sched_port = free_port()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._starts = 0
        try:
            self.start("scheduler")
            for i in range(prefill):
                self.start(f"prefill-{i}")
            for i in range(decode):
                self.start(f"decode-{i}")
            for i in range(both):
                self.start(f"both-{i}")
            for name, extra in workers:
                self.start(name, extra)
            self.start("gateway")
            wait_http(self.base + "/health", self.procs["gateway"], timeout=420,
                      others=tuple(p for n, p in self.procs.items() if n != "gateway"))
        except BaseException:
            self.stop_all()
            raise

    @property
    def scheduler(self) -> str:
        return f"127.0.0.1:{self.sched_port}"

    def metrics_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name][1]}/metrics"

    def start(self, name: str, extra: tuple = ()) -> Proc:
        """Start (or restart, on its old ports) the service ``name``: scheduler, gateway, prefill-i,
        decode-i, both-i (colocated)."""
        role = name.split("-")[0]
        if name not in self.ports:
            self.ports[name] = (self.sched_port if role == "scheduler" else self.port if role == "gateway" else free_port(),
                                free_port())
        port, mport = self.ports[name]
        common = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(mport)]
        if self.mesh_secret:
            common += ["--mesh-secret-file", mesh_secret_file(self.tmp)]
        if role == "scheduler":
            args = common + self.scheduler_args
        elif role == "gateway":
            args = common + ["--scheduler", self.scheduler, "--grpc-port", "-1"] + self.gateway_args
        else:
            args = common + ["--scheduler", self.scheduler] + self.WORKER_ARGS + self.worker_args + self.role_args.get(role, [])
        self._starts += 1
        proc = Proc([sys.executable, "-m", MODULES[role], *args, *extra], self.tmp / f"{name}-{self._starts}.log", self.env)
        self.procs[name] = proc
        return proc

    def wait_workers(self, prefill: int, decode: int, timeout: float = 120.0, both: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ws = list_workers(self.scheduler)
                roles = [w.info.role for w in ws if not w.draining]
                if (roles.count(1), roles.count(2), roles.count(3)) == (prefill, decode, both):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"expected {prefill} prefill + {decode} decode + {both} colocated workers; logs:\n" +
                           "\n".join(f"--- {n}\n{p.tail(15)}" for n, p in self.procs.items()))

    def wait_registered(self, name: str, timeout: float = 120.0) -> None:
        """Until the (re)started worker ``name`` has registered with the scheduler (its log says so)."""
        self.procs[name].wait_log("registered with scheduler", timeout)

    def pid(self, name: str) -> int:
        return self.procs[name].p.pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid(name), sig)

    def stop(self, name: str, timeout: float = 60.0) -> int:
        return self.procs[name].stop(signal.SIGTERM, timeout)

    def stop_all(self) -> dict[str, int]:
        order = sorted(self.procs, key=lambda n: STOP_ORDER.index(n.split("-")[0]))
        return {n: self.procs[n].stop(signal.SIGTERM, 60) for n in order}


class Mesh:
    """``pdmesh up`` as a subprocess (it starts scheduler, workers and gateway as its children)."""

    def __init__(self, tmp: Path, prefill: int = 1, decode: int = 1, extra: Optional[list[str]] = None,
                 worker_args: str = "", env: Optional[dict] = None, colocated: int = 0) -> None:
        self.port = free_port()
        self.sched_port = free_port()
        self.metrics_port = free_port()
        self.sched_metrics_port = free_port()
        self.grpc_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "services.cli", "up", "--port", str(self.port), "--scheduler-port",
                str(self.sched_port), "--metrics-port", str(self.metrics_port), "--scheduler-metrics-port",
                str(self.sched_metrics_port), "--grpc-port", str(self.grpc_port), "--prefill", str(prefill), "--decode", str(decode),
                "--colocated", str(colocated), "--mesh-secret-file", mesh_secret_file(tmp),
                "--worker-args", f"--cpu-threads 1 --kv-cache-memory 268435456 {worker_args}".strip(), *(extra or [])]
        self.proc = Proc(args, tmp / f"mesh-{self.port}.log", env)
        self.proc.wait_log("pdmesh is up", timeout=420)  # every child READY and the gateway healthy

    @property
    def scheduler(self) -> str:
        return f"127.0.0.1:{self.sched_port}"

    def workers(self) -> list[spb.WorkerStatus]:
        return list_workers(self.scheduler)

    @property
    def gateway_metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_idle(self, timeout: float = 15.0) -> list[spb.WorkerStatus]:
        return wait_idle(self.scheduler, timeout)

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
