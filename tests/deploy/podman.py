"""Drive podman and podman-compose for the deploy smoke test: deploy/docker-compose.yml run under a
project name of its own with free host ports, its containers' state, health, metrics and logs, and
what is left on the host after it stops."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
BUILD_SCRIPT = ROOT / "deploy" / "podman" / "build.sh"
IMAGE = "pdmesh:cpu"
SERVICES = {"scheduler": 8083, "gateway": 8080, "prefill-cpu": 8081, "decode-cpu": 8082}
"""The services of the cpu profile and the metrics port each serves inside its container."""
CNI_DNSNAME = Path("/usr/lib/cni/dnsname")
APT_PACKAGES = "podman runc golang-github-containernetworking-plugin-dnsname debootstrap"
"""What .ci/run installs (Debian packages) for this test."""


def podman_compose() -> Optional[str]:
    """The podman-compose of this environment (the `test` extra installs it next to Python)."""
    beside = Path(sys.executable).with_name("podman-compose")
    return str(beside) if beside.exists() else shutil.which("podman-compose")


def missing_prerequisites() -> list[str]:
    """What this host lacks to build the image and run the stack (empty: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (rootful podman; debootstrap for the local base image)")
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not CNI_DNSNAME.exists():
        missing.append(f"CNI dnsname plugin ({CNI_DNSNAME}: service names on the compose network)")
    if podman_compose() is None:
        missing.append("podman-compose (pip install -e '.[test]')")
    return missing


def _env(extra: dict[str, str]) -> dict[str, str]:
    return dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF), **extra)


def build_image(log: Path, timeout: float = 1200.0) -> float:
    """deploy/podman/build.sh (local base, wheelhouse, offline build); seconds it took."""
    t0 = time.monotonic()
    with open(log, "wb") as f:
        rc = subprocess.run([str(BUILD_SCRIPT), IMAGE], stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                            env=_env({"PYTHON": sys.executable})).returncode
    if rc != 0:
        raise AssertionError(f"image build failed (rc {rc}):\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return time.monotonic() - t0


@dataclass(frozen=True)
class Container:
    """One container of the stack, as `podman ps` saw it."""

    name: str
    id: str
    service: str
    state: str
    exit_code: int


class Stack:
    """The compose file's cpu profile under project ``project``; the gateway's ports on the host
    are ``http_port``, ``grpc_port`` and ``metrics_port`` (PDMESH_*_PORT)."""

    def __init__(self, project: str, http_port: int, grpc_port: int, metrics_port: int, log: Path) -> None:
        self.project = project
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log = log
        self.env = _env({"PDMESH_HTTP_PORT": str(http_port), "PDMESH_GRPC_PORT": str(grpc_port),
                         "PDMESH_METRICS_PORT": str(metrics_port), "PDMESH_MESH_SECRET": secrets.token_hex(32)})
        self.ids: set[str] = set()
        """Every container id this stack has had (for the leftover check)."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def compose(self, *args: str, timeout: float = 180.0) -> str:
        cmd = [podman_compose(), "-f", str(COMPOSE_FILE), "-p", self.project, "--profile", "cpu", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        with open(self.log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}\n")
        if p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[3:])} failed (rc {p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
        return p.stdout

    def podman(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed (rc {p.returncode}): {p.stderr[-2000:]}")
        return p

    def containers(self) -> dict[str, Container]:
        """This project's containers by service (running or not)."""
        out = self.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                          "--format", "json").stdout
        found = {}
        for c in json.loads(out or "[]"):
            labels = c.get("Labels") or {}
            service = labels.get("com.docker.compose.service", "")
            found[service] = Container(c["Names"][0], c["Id"], service, c["State"], int(c.get("ExitCode", 0)))
            self.ids.add(c["Id"])
        return found

    def logs(self, service: str, tail: int = 40) -> str:
        c = self.containers().get(service)
        if c is None:
            return f"({service}: no container)"
        p = self.podman("logs", "--tail", str(tail), c.name, check=False)
        return f"--- {service} ({c.state}, exit {c.exit_code})\n{p.stdout}{p.stderr}"

    def all_logs(self) -> str:
        return "\n".join(self.logs(s) for s in SERVICES)

    def healthy(self, service: str) -> bool:
        """The compose file's health check of ``service``, run in its container now (podman runs
        health checks from systemd timers, which a host without systemd does not have)."""
        c = self.containers()[service]
        return self.podman("healthcheck", "run", c.name, check=False, timeout=30).returncode == 0

    def wait_healthy(self, timeout: float = 300.0) -> float:
        """Until every service's own health check passes and the gateway answers /health with 200
        on its published port; fails at once if a container exits. Seconds it took."""
        t0 = time.monotonic()
        pending = set(SERVICES)
        while time.monotonic() - t0 < timeout:
            cs = self.containers()
            down = [s for s in SERVICES if s not in cs or cs[s].state != "running"]
            if down:
                raise AssertionError(f"not running: {down}\n{self.all_logs()}")
            pending = {s for s in pending if not self.healthy(s)}
            if not pending:
                try:
                    if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass
            time.sleep(2)
        raise AssertionError(f"not healthy after {timeout:.0f}s: {sorted(pending) or 'gateway /health'}\n{self.all_logs()}")

    def metrics(self, service: str) -> str:
        """``service``'s /metrics page, read inside its container (worker ports are not published)."""
        c = self.containers()[service]
        code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                f"'http://127.0.0.1:{SERVICES[service]}/metrics', timeout=5).read().decode())")
        return self.podman("exec", c.name, "python", "-c", code).stdout

    def leftovers(self) -> list[str]:
        """Anything of this project still on the host: containers, pods, networks, the processes
        that ran them (conmon by container id; the network's dnsmasq and podman-compose by project
        name), a listener on the gateway's host ports."""
        left = []
        label = f"label=io.podman.compose.project={self.project}"
        for kind, args in (("container", ["ps", "-a", "--filter", label, "--format", "{{.Names}}"]),
                           ("pod", ["pod", "ps", "--filter", f"name={self.project}", "--format", "{{.Name}}"]),
                           ("network", ["network", "ls", "--filter", f"name={self.project}", "--format", "{{.Name}}"])):
            left += [f"{kind} {n}" for n in self.podman(*args).stdout.split()]
        for pid in (d for d in os.listdir("/proc") if d.isdigit()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if self.project in cmdline or any(cid in cmdline for cid in self.ids):
                left.append(f"process {pid}: {cmdline[:120]}")
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                left.append(f"listener on host port {port}")
            except OSError:
                pass
        return left
