"""``pdmesh up``'s supervisor with real child processes: a child that exits is started again after
a back-off that doubles up to its maximum, the others keep running untouched, a child that stayed
up long enough starts over at the initial delay, and every exit and restart is one line."""

from __future__ import annotations

import io
import sys
import time

from services.procs import ProcessGroup, Supervisor

CRASH = "import sys; print('READY decode-0 127.0.0.1:1', flush=True); sys.exit(3)"
SERVE = "import time; print('READY prefill-0 127.0.0.1:2', flush=True); time.sleep(120)"


def run_until(sup: Supervisor, cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        sup.poll()
        time.sleep(0.02)


def test_a_crashing_child_is_restarted_with_backoff_and_the_others_keep_running():
    err = io.StringIO()
    group = ProcessGroup(io.StringIO())
    crash = group.spawn("decode-0", [sys.executable, "-c", CRASH])
    steady = group.spawn("prefill-0", [sys.executable, "-c", SERVE])
    pid = steady.proc.pid
    sup = Supervisor(group, err, initial=0.2, maximum=0.8, stable_after=60)
    try:
        starts = [time.monotonic()]
        while crash.restarts < 4:
            n = crash.restarts
            run_until(sup, lambda n=n: crash.restarts > n)
            starts.append(time.monotonic())
        run_until(sup, lambda: crash.exited() is not None)
        sup.poll()
    finally:
        group.stop(grace=5)
    lines = err.getvalue().splitlines()
    delays = [line.split("restarting it in ")[1].split("s ")[0] for line in lines if "restarting it in" in line]
    assert delays[:5] == ["0.2", "0.4", "0.8", "0.8", "0.8"], lines  # doubling, capped at the maximum
    assert all("exited with code 3" in line for line in lines if "restarting" in line)
    assert sum("restarted decode-0" in line for line in lines) == 4 and "decode-0 is back: 127.0.0.1:1" in err.getvalue()
    gaps = [b - a for a, b in zip(starts[1:], starts[2:])]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.8, gaps
    assert steady.proc.pid == pid and steady.restarts == 0  # never touched


def test_a_child_that_stayed_up_starts_over_at_the_initial_delay():
    err = io.StringIO()
    group = ProcessGroup(io.StringIO())
    child = group.spawn("gateway", [sys.executable, "-c", "import time; time.sleep(0.6)"])
    sup = Supervisor(group, err, initial=0.2, maximum=10, stable_after=0.3)
    try:
        while child.restarts < 3:
            n = child.restarts
            run_until(sup, lambda n=n: child.restarts > n)
    finally:
        group.stop(grace=5)
    delays = [line.split("restarting it in ")[1].split("s ")[0] for line in err.getvalue().splitlines() if "restarting it in" in line]
    assert delays == ["0.2", "0.2", "0.2"], err.getvalue()
