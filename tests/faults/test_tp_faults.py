"""A rank of a tensor-parallel worker killed: its worker goes down cleanly (streams end with an error
event, it leaves the mesh and exits with status 1, no rank left behind), a prefill whose KV was
held recomputes on decode with the same tokens, and nothing is lost once the worker is back.
Prefill TP 2 and decode TP 2 of a tiny random Qwen3 on CPU (gloo)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.faults.client import API_KEY, WORKER_ARGS, Tally, body, greedy, nothing_lost
from tests.faults.test_worker_faults import _one, run
from tests.meshproc import Services, gateway_books, list_workers, wait_http, wait_until

PROMPT = list(range(2000, 2100))


@pytest.fixture(scope="module")
def tp_pair(tmp_path_factory, tiny_qwen3, embedded_dir):
    model = ("--model", tiny_qwen3, "--tokenizer", str(embedded_dir))
    svc = Services(tmp_path_factory.mktemp("tp-faults"), prefill=1, decode=1,
                   worker_args=(*model, "--tensor-parallel-size", "2", "--max-model-len", "512", *WORKER_ARGS),
                   gateway_args=(*model, "--api-key", API_KEY))
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


def rank_pid(svc: Services, name: str) -> int:
    """The pid of rank 1 of worker ``name`` (its log names the ranks it started)."""
    m = re.search(r"started ranks 1\.\.1 \(pids \[(\d+)\]\)", svc.procs[name].log_path.read_text())
    assert m, svc.procs[name].tail()
    return int(m.group(1))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting to be reaped is gone too
        return f.read().split(")")[-1].split()[0] == "Z"


def registered(svc: Services) -> set[str]:
    return {w.info.address.rsplit(":", 1)[1] for w in list_workers(svc.scheduler)}


def restart(svc: Services, name: str) -> None:
    svc.start(name)
    svc.wait_registered(name)
    svc.wait_workers(1, 1)
    wait_http(svc.base + "/health", svc.procs["gateway"])


def test_killed_decode_rank_takes_its_worker_down_cleanly(tp_pair, report):
    svc = tp_pair
    ref = greedy(svc, PROMPT[:30], 8)
    before = gateway_books(svc.metrics_url("gateway"))
    tally = Tally()
    rank1 = rank_pid(svc, "decode-0")
    t0 = time.monotonic()
    o = run(_one(svc, tally, body(PROMPT[:30], 400), 3, lambda: os.kill(rank1, signal.SIGKILL)))
    assert o.kind == "error" and o.status == 200 and o.finish_reason is None, o  # an error event, not a hang
    assert time.monotonic() - t0 < 20, "the stream hung"
    assert svc.procs["decode-0"].p.wait(30) == 1, svc.procs["decode-0"].tail()  # the worker exits, status 1
    log = svc.procs["decode-0"].log_path.read_text()
    assert f"rank 1 (pid {rank1}) exited with status -9" in log and "cannot serve any more" in log, svc.procs["decode-0"].tail()
    assert str(svc.ports["decode-0"][0]) not in registered(svc), "the dead worker is still routable"
    restart(svc, "decode-0")
    leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=2)
    assert greedy(svc, PROMPT[:30], 8) == ref
    report.add("tp_decode_rank_killed_mid_stream", tally, faults_injected=1, blocks_leaked=leaked)


def test_killed_prefill_rank_while_kv_is_held_recomputes(tp_pair, report):
    svc = tp_pair
    ref = greedy(svc, PROMPT, 16)
    before = gateway_books(svc.metrics_url("gateway"))
    tally = Tally()
    rank1 = rank_pid(svc, "prefill-0")
    svc.kill("decode-0", signal.SIGSTOP)  # decode takes the request but cannot pull yet

    def kill_prefill_rank_then_resume_decode() -> None:  # token 0 arrived: prefill holds the KV on both ranks
        os.kill(rank1, signal.SIGKILL)
        wait_until(lambda: not svc.procs["prefill-0"].alive(), 20, "the prefill worker went down with its rank")
        svc.kill("decode-0", signal.SIGCONT)

    try:
        o = run(_one(svc, tally, body(PROMPT, 16), 1, kill_prefill_rank_then_resume_decode))
    finally:
        svc.kill("decode-0", signal.SIGCONT)
    assert o.kind == "ok" and o.text == ref, o  # the pull failed; decode computed the prompt itself
    assert svc.procs["prefill-0"].p.wait(10) == 1
    assert gone(rank1)
    restart(svc, "prefill-0")
    leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("tp_prefill_rank_killed_kv_held", tally, faults_injected=1, blocks_leaked=leaked)


def test_an_idle_worker_whose_rank_dies_leaves_the_mesh(tp_pair):
    svc = tp_pair
    rank1 = rank_pid(svc, "decode-0")
    os.kill(rank1, signal.SIGKILL)
    assert svc.procs["decode-0"].p.wait(15) == 1, svc.procs["decode-0"].tail()
    wait_until(lambda: str(svc.ports["decode-0"][0]) not in registered(svc), 10, "the worker left routing")
    restart(svc, "decode-0")
    assert greedy(svc, PROMPT[:20], 4)
