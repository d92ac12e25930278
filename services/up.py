"""``pdmesh up``: a whole mesh on this host as separate processes.

Lifecycle
---------
1. Check everything that can be checked before a process starts, and fail in one line naming the
   flag: flag values and per-role argument strings (shell quoting), the model and tokenizer
   (resolved and loaded once here; a GGUF is converted once for all children), the placement of
   workers on GPUs and whether each share of a GPU holds the model (``pdmesh.placement``), and
   every fixed port (in use by another process?).
2. Start a scheduler, N prefill, M decode and K colocated workers (free ports, each on its GPUs
   with its memory share), and a gateway. API keys reach the gateway in a file (mode 0600), never
   on a command line that ``ps`` shows; so does the mesh secret that authenticates every internal
   call (a fresh random one, or ``--mesh-secret-file``), and ``--tls-*`` reach every service.
3. Ready when every child has printed its READY line (``services.procs``) and our own gateway
   answers ``/health``; then print every listener: gateway HTTP, public gRPC, every metrics port,
   each worker's address and device.
4. While the mesh runs, a child that exits (a crash, an OOM kill) is restarted with back-off and
   the others keep serving (``services.procs.Supervisor``); before it is up, one that exits stops
   everything with one line.
5. Ctrl-C/SIGTERM stops them all (gateway first, scheduler last; SIGKILL after a grace period);
   children die with ``pdmesh up`` (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shlex
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pdmesh import placement
from pdmesh.config import ConfigError, ModelConfig, _require, add_flags, from_flags
from pdmesh.env import ENV
from pdmesh.kv.shards import local_kv_heads
from pdmesh.models import check_tensor_parallel
from pdmesh.rpc.tls import TlsConfig
from services.procs import Child, ProcessGroup, Supervisor

MODULES = {"gateway": "services.gateway", "scheduler": "services.scheduler", "prefill": "services.prefill",
           "decode": "services.decode", "both": "services.decode.both"}
"""Service commands and the module each runs: ``pdmesh ROLE`` is ``python -m MODULE``."""


class UpError(Exception):
    """Something to report in one line before or while starting the mesh."""


@dataclass(frozen=True)
class UpConfig:
    """What ``pdmesh up`` starts, where, and with which flags."""

    port: int = 8000
    """Gateway HTTP port (the OpenAI API)."""
    host: str = "127.0.0.1"
    """Address the gateway binds (0.0.0.0 for every interface)."""
    grpc_port: int = 50050
    """Gateway's public gRPC API port (-1: off)."""
    metrics_port: int = 8080
    """Gateway's /metrics port (-1: off)."""
    scheduler_port: int = 50051
    """Scheduler gRPC port (on 127.0.0.1)."""
    scheduler_metrics_port: int = 8083
    """Scheduler's /metrics port."""
    prefill: int = 1
    """Prefill workers."""
    decode: int = 1
    """Decode workers."""
    colocated: int = 0
    """Colocated workers ('pdmesh both': prefill and decode in one engine). '--prefill 0 --decode 0
    --colocated 1' serves without disaggregation."""
    prefill_devices: Optional[str] = None
    """GPUs of the prefill workers, e.g. '0' or '0,1' (one per worker, or one shared by all);
    default: every worker goes to the GPU with the fewest workers so far."""
    decode_devices: Optional[str] = None
    """GPUs of the decode workers (as --prefill-devices)."""
    colocated_devices: Optional[str] = None
    """GPUs of the colocated workers (as --prefill-devices)."""
    tensor_parallel_size: int = 1
    """Ranks of every worker (one GPU each: a worker of TP N takes a group of N GPUs, listed in
    --prefill-devices & co as one group per worker, e.g. '0,1'); the per-role flags override it."""
    prefill_tensor_parallel_size: Optional[int] = None
    """Ranks of each prefill worker (default: --tensor-parallel-size)."""
    decode_tensor_parallel_size: Optional[int] = None
    """Ranks of each decode worker (default: --tensor-parallel-size); may differ from prefill's: KV
    moves between TP sizes."""
    colocated_tensor_parallel_size: Optional[int] = None
    """Ranks of each colocated worker (default: --tensor-parallel-size)."""
    enable_expert_parallel: bool = False
    """Mixture-of-experts models: every worker of TP N holds whole experts per rank (num_experts / N
    each) instead of a slice of every expert (the workers' --enable-expert-parallel)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of each GPU the mesh may use; workers sharing a GPU split it evenly."""
    api_key: tuple[str, ...] = ()
    """API keys the gateway requires on every route but /health and /version (repeat for several;
    prefer --api-key-file or PDMESH_API_KEY: a flag shows in 'ps')."""
    api_key_file: Optional[str] = None
    """File holding the gateway's API keys (one per line)."""
    mesh_secret_file: Optional[str] = None
    """File holding the mesh secret every service authenticates its internal calls with (to let
    services started elsewhere join); default: a fresh random secret in a file only this user can
    read, removed when 'pdmesh up' exits."""
    worker_args: str = ""
    """More flags for every worker, parsed with shell quoting (see 'pdmesh prefill --help')."""
    prefill_args: str = ""
    """More flags for prefill workers only (shell quoting)."""
    decode_args: str = ""
    """More flags for decode workers only (shell quoting)."""
    colocated_args: str = ""
    """More flags for colocated workers only (shell quoting)."""
    gateway_args: str = ""
    """More flags for the gateway (shell quoting; see 'pdmesh gateway --help')."""
    scheduler_args: str = ""
    """More flags for the scheduler (shell quoting; see 'pdmesh scheduler --help')."""
    tracing: Optional[str] = None
    """auto, otlp, console or off for every service (default: the standard OTEL_* variables, which
    every service inherits)."""
    startup_timeout: float = 600.0
    """Seconds to wait for every service to be ready (loading, compiling kernels, capturing graphs)."""

    def __post_init__(self) -> None:
        counts = (self.prefill, self.decode, self.colocated)
        _require(min(counts) >= 0, "prefill", "worker counts are >= 0")
        _require((self.prefill == 0) == (self.decode == 0) and bool(self.prefill or self.colocated), "prefill",
                 "need --prefill >= 1 and --decode >= 1, or --colocated >= 1 (with --prefill 0 --decode 0 or with both)")
        _require(not (self.api_key and self.api_key_file), "api_key_file", "give --api-key or --api-key-file, not both")
        _require(self.startup_timeout > 0, "startup_timeout", "must be > 0")
        for role in ("prefill", "decode", "both"):
            _require(1 <= self.tp(role) <= 64, "tensor_parallel_size", "must be in 1..64")

    def tp(self, role: str) -> int:
        """Tensor-parallel size of the role's workers."""
        own = {"prefill": self.prefill_tensor_parallel_size, "decode": self.decode_tensor_parallel_size,
               "both": self.colocated_tensor_parallel_size}[role]
        return own or self.tensor_parallel_size

    def role_args(self, role: str) -> list[str]:
        """Every-worker flags then the role's own, split with shell quoting."""
        own = {"prefill": ("prefill_args", self.prefill_args), "decode": ("decode_args", self.decode_args),
               "both": ("colocated_args", self.colocated_args)}[role]
        return split_args("worker_args", self.worker_args) + split_args(*own)


def split_args(name: str, text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--{name.replace('_', '-')} {text!r}: {exc}") from None


def up_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdmesh up", description="Start a whole mesh on this host as separate processes.")
    add_flags(p, UpConfig)
    add_flags(p, ModelConfig)
    add_flags(p, TlsConfig)
    return p


def _tls_flags(tls: TlsConfig) -> list[str]:
    """The --tls-* flags of every service (each presents the same certificate)."""
    out = []
    for name in ("tls_cert", "tls_key", "tls_ca", "tls_server_name"):
        if getattr(tls, name):
            out += ["--" + name.replace("_", "-"), str(getattr(tls, name))]
    return out


def _model_flags(m: ModelConfig, gateway: bool) -> list[str]:
    out = ["--model", m.model, "--load-format", m.load_format]
    for f in dataclasses.fields(ModelConfig):
        val = getattr(m, f.name)
        if f.name in ("model", "load_format") or val is None or val == f.default or (gateway and f.name in ("dtype", "seed")):
            continue
        out += ["--" + f.name.replace("_", "-"), str(val)]
    return out


def check_model(m: ModelConfig):
    """Resolve the model (converting a GGUF once for every child) and load its tokenizer."""
    from pdmesh.models.loader import resolve
    from pdmesh.tokenizer import Tokenizer

    if m.tokenizer and not Path(m.tokenizer).exists():
        raise UpError(f"--tokenizer {m.tokenizer}: no such file or directory")
    try:
        res = resolve(m)
    except Exception as exc:  # noqa: BLE001 - any reason is reported in one line
        raise UpError(f"--model {m.model}: {exc}") from None
    if not res.tokenizer_path:
        raise UpError(f"--model {m.model} has no tokenizer: give --tokenizer DIR")
    try:
        Tokenizer(res.tokenizer_path)
    except Exception as exc:  # noqa: BLE001
        raise UpError(f"--tokenizer {m.tokenizer or res.tokenizer_path}: cannot load it: {exc}") from None
    return res


def plan_workers(cfg: UpConfig, m: ModelConfig, res) -> list[placement.WorkerPlacement]:
    counts = {"prefill": cfg.prefill, "decode": cfg.decode, "both": cfg.colocated}
    flags = {"prefill": cfg.prefill_devices, "decode": cfg.decode_devices, "both": cfg.colocated_devices}
    devices = {r: placement.parse_devices(placement.ROLE_FLAGS[r], v) for r, v in flags.items() if v}
    tps = {r: cfg.tp(r) for r in counts}
    for role in counts:
        own = [a.split("=")[0] for a in cfg.role_args(role)]
        try:
            if counts[role]:
                check_tensor_parallel(res.arch, tps[role], cfg.enable_expert_parallel or "--enable-expert-parallel" in own)
        except ValueError as err:
            flag = {"prefill": "--prefill", "decode": "--decode", "both": "--colocated"}[role]
            raise UpError(f"{err} ({flag} workers of --model {m.model})") from None
        if "--tensor-parallel-size" in own:
            raise UpError("--tensor-parallel-size in the worker args: use pdmesh up's --tensor-parallel-size or "
                          "--prefill-/--decode-/--colocated-tensor-parallel-size (placement needs it)")
        for flag in ("--device", "--gpu-memory-utilization"):
            if flag in own:
                if devices:
                    raise UpError(f"{flag} in the worker args conflicts with --prefill-devices/--decode-devices/"
                                  "--colocated-devices: use one or the other")
                return placement.plan(counts, 0, gpus_per_worker=tps)  # the user places workers by hand
    gpus = placement.visible_gpu_memory()
    plan = placement.plan(counts, len(gpus), devices, cfg.gpu_memory_utilization, gpus_per_worker=tps)
    if gpus:
        dtype_bytes = 4 if m.dtype == "float32" else 2
        arch = res.arch
        need = {tp: placement.memory_needed(arch.num_parameters() * dtype_bytes,
                                            2 * arch.num_layers * local_kv_heads(arch.num_kv_heads, tp) * arch.head_dim * dtype_bytes,
                                            m.max_model_len or arch.max_position_embeddings, tp)
                for tp in set(tps.values())}
        placement.check_fit(plan, gpus, need, res.served_name)
    return plan


def check_ports(cfg: UpConfig) -> None:
    """Fail before starting anything when a fixed port is taken or given twice."""
    wanted = [("--port", cfg.host, cfg.port), ("--grpc-port", cfg.host, cfg.grpc_port),
              ("--metrics-port", cfg.host, cfg.metrics_port), ("--scheduler-port", "127.0.0.1", cfg.scheduler_port),
              ("--scheduler-metrics-port", "127.0.0.1", cfg.scheduler_metrics_port)]
    seen: dict[int, str] = {}
    for flag, host, port in wanted:
        if port < 0 or (port == 0 and flag != "--port"):
            continue
        if port in seen:
            raise UpError(f"{flag} and {seen[port]} are both {port}")
        seen[port] = flag
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no clash
            try:
                s.bind((host, port))
            except OSError as exc:
                raise UpError(f"port {port} ({flag}) is in use by another process ({exc.strerror}); "
                              f"stop it or choose another {flag}") from None


def _api_key_file(cfg: UpConfig, tmp: Path) -> Optional[str]:
    if cfg.api_key_file:
        if not Path(cfg.api_key_file).is_file():
            raise UpError(f"--api-key-file {cfg.api_key_file}: no such file")
        return cfg.api_key_file
    keys = list(cfg.api_key) or [k for k in ENV.API_KEY.get().split(",") if k.strip()]
    if not keys:
        return None
    path = tmp / "api-keys"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(k.strip() + "\n" for k in keys))
    return str(path)


def _mesh_secret_file(cfg: UpConfig, tmp: Path) -> str:
    """The given --mesh-secret-file, or a fresh 256-bit secret in a file readable only by this user."""
    if cfg.mesh_secret_file:
        if not Path(cfg.mesh_secret_file).is_file():
            raise UpError(f"--mesh-secret-file {cfg.mesh_secret_file}: no such file")
        return cfg.mesh_secret_file
    path = tmp / "mesh-secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return str(path)


def _wait_health(url: str, group: ProcessGroup, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        err = group.failed()
        if err:
            raise RuntimeError(err)
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the gateway did not become healthy in {timeout:.0f}s ({url}): no worker routable")


def _listeners(children: list[Child], plan: dict[str, placement.WorkerPlacement], host: str) -> str:
    rows = []
    for c in children:
        r = c.ready
        if r is None:
            continue
        m = r.extra.get("metrics")
        metrics = f"metrics http://{host if c.role == 'gateway' else '127.0.0.1'}:{m}/metrics" if m and m != "-1" else ""
        if c.role == "gateway":
            grpc = f"gRPC {r.extra['grpc']}" if r.extra.get("grpc") else ""
            rows.append((c.name, f"{r.address}/v1", grpc, metrics))
        else:
            p = plan.get(c.name)
            where = r.extra.get("devices", r.extra.get("device", ""))
            if r.extra.get("tp"):
                where += f" (TP {r.extra['tp']})"
            if p is not None and p.gpu_memory_utilization is not None:
                where += f" ({p.gpu_memory_utilization:.2f} of the GPU)"
            rows.append((c.name, r.address, where, metrics))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  " + "  ".join(v.ljust(width[i]) if i < 3 else v for i, v in enumerate(row)).rstrip() for row in rows)


def up(argv: list[str]) -> int:
    try:
        ns = up_parser().parse_args(argv)
        cfg, m, tls = from_flags(UpConfig, ns), from_flags(ModelConfig, ns), from_flags(TlsConfig, ns)
        for role in ("prefill", "decode", "both"):
            cfg.role_args(role)
        gateway_extra, scheduler_extra = split_args("gateway_args", cfg.gateway_args), split_args("scheduler_args", cfg.scheduler_args)
        check_ports(cfg)
        res = check_model(m)
        plan = plan_workers(cfg, m, res)
    except (ConfigError, UpError, placement.PlacementError) as exc:
        print(f"pdmesh up: {exc}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="pdmesh-up-"))
    try:
        return _run(cfg, m, plan, gateway_extra, scheduler_extra, tmp, tls)
    except UpError as exc:
        print(f"pdmesh up: {exc}", file=sys.stderr)
        return 2
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def _run(cfg: UpConfig, m: ModelConfig, plan: list[placement.WorkerPlacement], gateway_extra: list[str],
         scheduler_extra: list[str], tmp: Path, tls: TlsConfig) -> int:
    sched = f"127.0.0.1:{cfg.scheduler_port}"
    key_file = _api_key_file(cfg, tmp)
    # every service: tracing, TLS, and the mesh secret (its file's path shows in 'ps', never the secret)
    common = (["--tracing", cfg.tracing] if cfg.tracing else []) + _tls_flags(tls) + \
        ["--mesh-secret-file", _mesh_secret_file(cfg, tmp)]
    group = ProcessGroup()
    stopping = {"flag": False}

    def on_signal(signum, frame):  # noqa: ARG001
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def spawn(name: str, role: str, args: list[str]) -> None:
        group.spawn(name, [sys.executable, "-m", MODULES[role], *args])

    ep = ["--enable-expert-parallel"] if cfg.enable_expert_parallel else []
    try:
        spawn("scheduler", "scheduler", ["--host", "127.0.0.1", "--port", str(cfg.scheduler_port),
                                         "--metrics-port", str(cfg.scheduler_metrics_port), *common, *scheduler_extra])
        for w in plan:
            spawn(w.name, w.role, ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--scheduler", sched,
                                   *_model_flags(m, False), *common, *w.flags(), *ep, *cfg.role_args(w.role)])
        gw = ["--host", cfg.host, "--port", str(cfg.port), "--metrics-port", str(cfg.metrics_port),
              "--grpc-port", str(cfg.grpc_port), "--scheduler", sched, *_model_flags(m, True), *common, *gateway_extra]
        if key_file:
            gw += ["--api-key-file", key_file]
        spawn("gateway", "gateway", gw)
        group.wait_ready(cfg.startup_timeout)
        url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::', '') else cfg.host}:{cfg.port}"
        _wait_health(url + "/health", group, cfg.startup_timeout)
        print(f"pdmesh is up: {url}/v1 ({cfg.prefill} prefill, {cfg.decode} decode, {cfg.colocated} colocated). "
              f"Ctrl-C stops it.\n{_listeners(group.children, {w.name: w for w in plan}, url.split('//')[1].rsplit(':', 1)[0])}",
              flush=True)
        supervisor = Supervisor(group)
        while not stopping["flag"]:
            supervisor.poll()
            time.sleep(0.2)
    except (RuntimeError, TimeoutError) as exc:
        print(f"pdmesh up: {exc}", file=sys.stderr)
        group.stop()
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    print("pdmesh up: stopping", file=sys.stderr)
    return group.stop()
