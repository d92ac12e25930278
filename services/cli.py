"""``pdmesh``: one command for every service, and ``pdmesh up`` for the whole mesh.

``pdmesh up`` starts the mesh as separate OS processes on this host — a scheduler, N prefill and
M decode workers and/or K colocated ('both') workers, a gateway — passes the user's flags on, waits until the gateway is ready, and on
Ctrl-C/SIGTERM stops them all (SIGTERM, then SIGKILL after a grace period).  Children are bound to
it with PR_SET_PDEATHSIG, so none outlives it even if it is killed.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Optional

from pdmesh.config import DEFAULT_MODEL

MODULES = {"gateway": "services.gateway", "scheduler": "services.scheduler", "prefill": "services.prefill",
           "decode": "services.decode", "both": "services.decode.both"}
"""Service commands and the module each runs: ``pdmesh ROLE`` is ``python -m MODULE``."""
ROLES = tuple(MODULES)
STOP_ORDER = ("gateway", "prefill", "decode", "both", "scheduler")
"""Gateway first (stops taking requests), then workers, scheduler last."""


def _pdeathsig() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def up_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdmesh up", description="Start a whole mesh on this host as separate processes.")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port (default: 8000)")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address (default: 127.0.0.1)")
    p.add_argument("--scheduler-port", type=int, default=50051, help="scheduler gRPC port (default: 50051)")
    p.add_argument("--metrics-port", type=int, default=8080, help="gateway /metrics port (default: 8080; -1 off)")
    p.add_argument("--grpc-port", type=int, default=50050, help="public gRPC API port (default: 50050; -1 off)")
    p.add_argument("--scheduler-metrics-port", type=int, default=8083, help="scheduler /metrics port (default: 8083)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model dir, .gguf, dummy preset, or the embedded default")
    p.add_argument("--load-format", default="auto", help="auto, safetensors, gguf or dummy")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or .gguf (default: the model's)")
    p.add_argument("--served-model-name", default=None, help="model name clients send")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion in tokens")
    p.add_argument("--generation-config", default=None, help="auto (the model's generation_config.json), vllm (none) "
                   "or a directory, for every service (default: auto)")
    p.add_argument("--api-key", action="append", default=[], help="an API key the gateway requires on every route but "
                   "/health and /version (repeat for several)")
    p.add_argument("--prefill", type=int, default=1, help="number of prefill workers (default: 1)")
    p.add_argument("--decode", type=int, default=1, help="number of decode workers (default: 1)")
    p.add_argument("--colocated", type=int, default=0, help="number of colocated workers ('pdmesh both': prefill and "
                   "decode in one engine; default: 0). '--prefill 0 --decode 0 --colocated 1' serves without disaggregation")
    p.add_argument("--worker-args", default="", help="extra flags for every worker, as one string")
    p.add_argument("--gateway-args", default="", help="extra flags for the gateway, as one string")
    p.add_argument("--tracing", default=None, help="auto, otlp, console or off for every service (default: the "
                   "standard OTEL_* variables, which every service inherits)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    return p


class Mesh:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, role: str, args: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", MODULES[role], *args]
        proc = subprocess.Popen(cmd, preexec_fn=_pdeathsig)
        self.procs.append((name, proc))
        return proc

    def failed(self) -> Optional[str]:
        for name, p in self.procs:
            if p.poll() is not None:
                return f"{name} exited with code {p.returncode}"
        return None

    def stop(self, grace: float = 40.0) -> int:
        order = sorted(self.procs, key=lambda np: STOP_ORDER.index(np[0].split("-")[0]))
        for _, p in order:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, p in order:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return max((p.returncode or 0) for _, p in self.procs) if self.procs else 0


def _wait_ready(url: str, mesh: Mesh, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        err = mesh.failed()
        if err:
            raise RuntimeError(err)
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"mesh not ready after {timeout:.0f}s ({url})")


def up(argv: list[str]) -> int:
    a = up_parser().parse_args(argv)
    if min(a.prefill, a.decode, a.colocated) < 0 or (a.prefill == 0) != (a.decode == 0) or not (a.prefill or a.colocated):
        print("pdmesh up: need --prefill >= 1 and --decode >= 1, or --colocated >= 1 (with --prefill 0 --decode 0 "
              "or with both; counts are >= 0)", file=sys.stderr)
        return 2
    sched = f"127.0.0.1:{a.scheduler_port}"
    model = ["--model", a.model, "--load-format", a.load_format]
    for flag, val in (("--tokenizer", a.tokenizer), ("--served-model-name", a.served_model_name),
                      ("--max-model-len", a.max_model_len), ("--generation-config", a.generation_config)):
        if val is not None:
            model += [flag, str(val)]
    if a.model == DEFAULT_MODEL or a.model.endswith(".gguf"):
        # Convert the GGUF once, before several processes want it.
        from pdmesh.config import ModelConfig
        from pdmesh.models.loader import resolve

        resolve(ModelConfig(model=a.model, load_format=a.load_format))
    tracing = ["--tracing", a.tracing] if a.tracing else []
    mesh = Mesh()
    stopping = {"flag": False}

    def on_signal(signum, frame):  # noqa: ARG001
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        mesh.spawn("scheduler", "scheduler", ["--host", "127.0.0.1", "--port", str(a.scheduler_port),
                                              "--metrics-port", str(a.scheduler_metrics_port), *tracing])
        extra = a.worker_args.split()
        for role, count in (("prefill", a.prefill), ("decode", a.decode), ("both", a.colocated)):
            for i in range(count):
                mesh.spawn(f"{role}-{i}", role, ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                                                 "--scheduler", sched, *model, *tracing, *extra])
        gw = ["--host", a.host, "--port", str(a.port), "--metrics-port", str(a.metrics_port), "--grpc-port", str(a.grpc_port),
              "--scheduler", sched,
              *model, *tracing, *a.gateway_args.split()]
        for key in a.api_key:
            gw += ["--api-key", key]
        mesh.spawn("gateway", "gateway", gw)
        url = f"http://{'127.0.0.1' if a.host in ('0.0.0.0', '') else a.host}:{a.port}"
        _wait_ready(url + "/health", mesh, a.startup_timeout)
        print(f"pdmesh is up: {url}/v1 ({a.prefill} prefill, {a.decode} decode, {a.colocated} colocated). Ctrl-C stops it.",
              flush=True)
        while not stopping["flag"]:
            err = mesh.failed()
            if err:
                print(f"pdmesh up: {err}; stopping the mesh", file=sys.stderr)
                mesh.stop()
                return 1
            time.sleep(0.2)
    except (RuntimeError, TimeoutError) as exc:
        print(f"pdmesh up: {exc}", file=sys.stderr)
        mesh.stop()
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    print("pdmesh up: stopping", file=sys.stderr)
    return mesh.stop()


def health(argv: list[str]) -> int:
    """Exit 0 when the target is healthy: ``--grpc host:port`` (grpc.health.v1) or ``--http URL``."""
    p = argparse.ArgumentParser(prog="pdmesh health", description="Health check for containers and scripts.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--grpc", help="host:port of a worker or the scheduler (gRPC health checking protocol)")
    g.add_argument("--http", help="URL that must answer 200 (e.g. the gateway's /health)")
    p.add_argument("--service", default="", help="gRPC service name to check (default: the server as a whole)")
    p.add_argument("--timeout", type=float, default=3.0)
    from pdmesh.config import add_flags, from_flags
    from pdmesh.rpc.tls import TlsConfig

    add_flags(p, TlsConfig)
    a = p.parse_args(argv)
    tls = from_flags(TlsConfig, a)
    try:
        if a.http:
            with urllib.request.urlopen(a.http, timeout=a.timeout) as r:
                return 0 if r.status == 200 else 1
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        ch = (grpc.secure_channel(a.grpc, tls.channel_credentials(), options=tls.channel_options()) if tls.enabled
              else grpc.insecure_channel(a.grpc))
        with ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout)
        return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pdmesh [--version] {up,gateway,scheduler,prefill,decode,both,health,bench} [flags]\n\n"
              "  up         start a whole mesh on this host (pdmesh up --help)\n"
              "  health     check a service's health (for containers)\n"
              "  bench      serving benchmark against any OpenAI-compatible server (pdmesh bench --help)\n"
              "  gateway    OpenAI-compatible HTTP gateway\n"
              "  scheduler  worker registry and routing\n"
              "  prefill    prefill worker\n"
              "  decode     decode worker\n"
              "  both       colocated worker: prefill and decode in one engine (no disaggregation)")
        sys.exit(0)
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-V", "--version"):
        from pdmesh import __version__

        print(f"pdmesh {__version__}")
        sys.exit(0)
    if cmd == "up":
        sys.exit(up(rest))
    if cmd == "health":
        sys.exit(health(rest))
    if cmd == "bench":
        from pdmesh.bench.cli import main as bench_main

        sys.exit(bench_main(rest))
    if cmd not in ROLES:
        print(f"pdmesh: unknown command {cmd!r}; one of up, {', '.join(ROLES)}", file=sys.stderr)
        sys.exit(2)
    import runpy

    sys.argv = [MODULES[cmd], *rest]
    runpy.run_module(MODULES[cmd], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
