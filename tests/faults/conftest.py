"""The fault and bad-input suite.  Every test drives real processes on
127.0.0.1, injects its faults, then checks that nothing was lost: within lease + 2 heartbeats every
worker is back at its baseline (all KV blocks free, nothing held for transfer, nothing running,
waiting or in flight) and the books balance (sent = ok + errors + aborted, on the client and in the
gateway's own counters).  The figures of the run go to ``--fault-report PATH`` (the committed
results/cpu/fault-suite.json is refreshed only when asked: ``--fault-report results/cpu/fault-suite.json``),
else to the run's temporary directory (the path is printed)."""

from __future__ import annotations

import pytest

from tests.faults.client import API_KEY, SuiteReport, report_path


@pytest.fixture(scope="session")
def report(request, tmp_path_factory):
    rep = SuiteReport(report_path(request, tmp_path_factory, "--fault-report", "fault-suite.json"),
                      "python -m pytest -q tests/faults --fault-report results/cpu/fault-suite.json", "fault-suite")
    yield rep
    rep.write()


@pytest.fixture(scope="package")
def shared(tmp_path_factory, embedded_dir):
    """One mesh for the bad-input, disconnect, backpressure and soak tests: API key on, small
    queue limits (gateway 16 in flight, prefill 8 pending), KV pulls slowed to 20 ms a chunk so
    that disconnects land inside transfers too."""
    from tests.faults.client import WORKER_ARGS
    from tests.meshproc import Services

    svc = Services(tmp_path_factory.mktemp("shared"), prefill=1, decode=1,
                   worker_args=WORKER_ARGS, role_args={"prefill": ("--max-pending-requests", "8", "--inject-kv-faults", "delay:0.02")},
                   gateway_args=("--api-key", API_KEY, "--max-inflight", "16", "--max-stop", "4", "--max-n", "4",
                                 "--max-request-bytes", "65536"))
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


@pytest.fixture
def soak_seconds(request) -> float:
    return request.config.getoption("--soak-seconds")
