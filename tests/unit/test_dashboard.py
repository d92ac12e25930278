"""The Grafana dashboard is valid dashboard JSON, and every query names a metric the services
export; the Prometheus config scrapes every role on its metrics port."""

import json
import re
from pathlib import Path

import yaml

from pdmesh.metrics import PREFIX, SPECS, exported_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_dashboard_is_valid_and_queries_name_exported_metrics():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "pdmesh.json").read_text())
    for key in ("uid", "title", "panels", "schemaVersion", "templating"):
        assert key in dash
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exported = exported_names()
    used = set()
    for p in dash["panels"]:
        assert {"type", "title", "gridPos", "targets"} <= set(p) and p["targets"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        for t in p["targets"]:
            names = set(re.findall(r"pdmesh:[a-z0-9_]+", t["expr"]))
            assert names, t["expr"]
            assert names <= exported, names - exported
            used |= names
    # every metric family shows on the dashboard
    families = {PREFIX + n for n in SPECS}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families <= shown, families - shown
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for want in ("qps", "in-flight", "tokens per minute", "per prefill worker", "per decode worker", "ttft", "tpot",
                 "e2e", "input length", "output length", "hit rate", "success rate"):
        assert want in titles, want


def test_prometheus_scrapes_every_role():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    text = json.dumps(cfg["scrape_configs"])
    for port in ("8080", "8081", "8082", "8083"):
        assert port in text
