"""The security suite (issue: trust nothing on the wire).  Real processes on 127.0.0.1; each attack
is tried as someone on the same network would (no credentials, a wrong mesh secret, or a mesh
member with another identity), must be refused, and the users' requests in flight must not notice:
they finish with their tokens, and afterwards nothing is lost (every worker back at baseline, the
gateway's books balanced).  The figures of the run go to ``--security-report PATH`` (the committed
results/cpu/security-suite.json is refreshed only when asked), else to the run's temporary directory."""

from __future__ import annotations

import pytest

from tests.faults.client import WORKER_ARGS, SuiteReport, report_path
from tests.meshproc import Services
from tests.security.attacker import HEADER_TIMEOUT, KEY, LEASE_MAX_S, MAX_CONNECTIONS, PULL_DELAY


@pytest.fixture(scope="session")
def security_report(request, tmp_path_factory):
    rep = SuiteReport(report_path(request, tmp_path_factory, "--security-report", "security-suite.json"),
                      "python -m pytest -q tests/security --security-report results/cpu/security-suite.json", "security-suite")
    yield rep
    rep.write()


@pytest.fixture(scope="package")
def mesh(tmp_path_factory, embedded_dir):
    """The mesh the attacks run against: scheduler, a prefill worker (pulls slowed to PULL_DELAY a
    chunk, leases limited to LEASE_MAX_S), a decode worker, a gateway with an API key and a small
    front door (MAX_CONNECTIONS, HEADER_TIMEOUT)."""
    svc = Services(tmp_path_factory.mktemp("attacks"), prefill=1, decode=1, worker_args=WORKER_ARGS,
                   role_args={"prefill": ("--inject-kv-faults", f"delay:{PULL_DELAY}", "--kv-lease-max-seconds", str(LEASE_MAX_S))},
                   gateway_args=("--api-key", KEY, "--max-connections", str(MAX_CONNECTIONS),
                                 "--header-timeout", str(HEADER_TIMEOUT)))
    svc.wait_workers(1, 1)
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs
