"""A service that has begun draining survives repeated SIGTERMs (Ctrl-C reaches the whole process
group and `pdmesh up` forwards its own) and exits 0."""

import os
import signal
import subprocess
import sys
import time

from tests.meshproc import free_port, mesh_secret_file


def test_repeated_sigterm_during_drain_still_exits_zero(tmp_path):
    log = open(tmp_path / "sched.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "services.scheduler", "--host", "127.0.0.1", "--port", str(free_port()),
                          "--metrics-port", "-1", "--drain-timeout", "0.5",
                          "--mesh-secret-file", mesh_secret_file(tmp_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while b"READY" not in (tmp_path / "sched.log").read_bytes():
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        while p.poll() is None and time.monotonic() < deadline:
            os.kill(p.pid, signal.SIGTERM)  # keeps coming while it drains and shuts down
            time.sleep(0.02)
        assert p.wait(5) == 0, (tmp_path / "sched.log").read_text()
    finally:
        if p.poll() is None:
            p.kill()
