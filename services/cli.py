"""``pdmesh``: one command for every service (``pdmesh ROLE`` runs ``python -m MODULE``), ``pdmesh up``
for the whole mesh on this host (``services.up``), ``pdmesh health`` for containers and ``pdmesh bench``."""

from __future__ import annotations

import argparse
import sys
import urllib.request
from typing import Optional

from services.procs import STOP_ORDER
from services.up import MODULES, up

ROLES = tuple(MODULES)
__all__ = ["MODULES", "ROLES", "STOP_ORDER", "main", "health", "up"]


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
