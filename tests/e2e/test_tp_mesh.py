"""Tensor-parallel workers in a real mesh on CPU: prefill TP 2 and TP 1, decode TP 1 and TP 2, every
pairing (the scheduler round-robins over the four pairs), KV handed between TP sizes over grpc and
nixl (UCX over TCP; staged by default: each prefill rank packed at BeginRead, heads of another TP
size landed through the decode worker's staging arena), greedy tokens equal to one TP-1 engine in
this process, pulled KV checked block by block against the source's checksums (``--kv-audit``:
layout-independent), every block and every staging extent back at the end."""

from __future__ import annotations

import signal

import pytest

from pdmesh.client import InferenceClient
from pdmesh.engine import LLM, SamplingParams
from tests.meshproc import Services, free_port, list_workers, scrape, wait_http, wait_idle, wait_until

PROMPTS = [list(range(1000, 1070)), [5, 17, 42, 7, 99, 3] * 7]
MAX_TOKENS = 12
WORKERS = ("prefill-0", "prefill-1", "decode-0", "decode-1")
TP = {"prefill-0": 2, "prefill-1": 1, "decode-0": 1, "decode-1": 2}


def _flags(name: str, transports: tuple[str, ...]) -> tuple[str, ...]:
    return ("--tensor-parallel-size", str(TP[name]), "--kv-transports", *transports)


@pytest.fixture(scope="module")
def tp_mesh(tmp_path_factory, tiny_qwen3, embedded_dir):
    """Prefill workers offer nixl and grpc; decode-0 (TP 1) pulls over grpc, decode-1 (TP 2) over nixl
    (a test swaps them)."""
    model = ("--model", tiny_qwen3, "--tokenizer", str(embedded_dir), "--served-model-name", "tiny")
    grpc_port = free_port()
    transports = {"prefill-0": ("nixl", "grpc"), "prefill-1": ("nixl", "grpc"), "decode-0": ("grpc",), "decode-1": ("nixl",)}
    svc = Services(tmp_path_factory.mktemp("tp-mesh"), prefill=0, decode=0, env={"UCX_TLS": "tcp"},
                   worker_args=(*model, "--kv-audit", "--max-model-len", "256"),
                   scheduler_args=("--routing", "round-robin"),
                   gateway_args=(*model, "--grpc-port", str(grpc_port)),
                   workers=tuple((n, _flags(n, transports[n])) for n in WORKERS))
    svc.grpc_port = grpc_port
    svc.wait_workers(2, 2)
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


@pytest.fixture(scope="module")
def reference(tiny_qwen3) -> dict:
    """Greedy tokens of one TP-1 engine in this process."""
    llm = LLM(model=tiny_qwen3, device="cpu", max_model_len=256)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), detokenize=False)
    return {tuple(p): o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)}


def _requests_by_worker(svc: Services) -> dict[str, int]:
    by_port = {w.info.address.rsplit(":", 1)[1]: w for w in list_workers(svc.scheduler)}
    return {n: by_port[str(svc.ports[n][0])].load.requests_total for n in WORKERS}


def _every_pair(svc: Services, reference: dict) -> None:
    """Each prompt four times in a row: the round-robin scheduler gives each of the four
    (prefill, decode) pairs one of them; tokens must equal the reference every time."""
    before = _requests_by_worker(svc)
    with InferenceClient(f"127.0.0.1:{svc.grpc_port}", timeout=120) as client:
        for prompt in PROMPTS:
            for _ in range(4):
                got = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True).token_ids
                assert got == reference[tuple(prompt)], "a TP hand-off changed the tokens"
    # every worker served 4 of the 8 requests (loads arrive with heartbeats, once a second)
    wait_until(lambda: {n: c - before[n] for n, c in _requests_by_worker(svc).items()} == {n: 4 for n in WORKERS},
               10, "every (prefill, decode) pair used")
    wait_idle(svc.scheduler, timeout=20, expect=4)
    for name in WORKERS:
        m = scrape(svc.metrics_url(name))
        assert m.get("pdmesh:kv_audit_mismatches_total", 0) == 0, f"{name}: pulled KV differs from the source's"


def _pulled(svc: Services, name: str, transport: str) -> float:
    return scrape(svc.metrics_url(name)).get(f'pdmesh:kv_transfer_bytes_total{{transport="{transport}"}}', 0.0)


def _staged_reads(svc: Services, name: str) -> float:
    """NIXL READs of packed regions into the decode worker's arena (mixed TP sizes always land there)."""
    return scrape(svc.metrics_url(name)).get('pdmesh:kv_nixl_reads_total{kind="staged"}', 0.0)


def _staging_idle(svc: Services) -> None:
    """Every staging extent is back on every worker (gauges refresh every 0.5 s)."""
    wait_until(lambda: all(scrape(svc.metrics_url(n)).get("pdmesh:kv_nixl_staging_used_bytes", 0.0) == 0 for n in WORKERS),
               10, "staging arenas empty")


def test_every_tp_pairing_gives_one_engines_tokens(tp_mesh, reference):
    """TP 2 -> TP 1 and TP 1 -> TP 1 over grpc; TP 2 -> TP 2 and TP 1 -> TP 2 over nixl."""
    _every_pair(tp_mesh, reference)
    assert _pulled(tp_mesh, "decode-0", "grpc") > 0 and _pulled(tp_mesh, "decode-1", "nixl") > 0
    assert _staged_reads(tp_mesh, "decode-1") > 0  # TP 1 -> TP 2: packed, landed on both ranks
    _staging_idle(tp_mesh)


def test_swapped_transports(tp_mesh, reference):
    """TP 2 -> TP 1 and TP 1 -> TP 1 over nixl; TP 2 -> TP 2 and TP 1 -> TP 2 over grpc."""
    svc = tp_mesh
    swap = {"decode-0": ("nixl",), "decode-1": ("grpc",)}
    for name in swap:
        svc.kill(name, signal.SIGTERM)  # both drain (idle: at once) side by side
    for name, transports in swap.items():
        assert svc.stop(name) == 0, svc.procs[name].tail()
        svc.start(name, _flags(name, transports))
    for name in swap:
        svc.wait_registered(name)
    svc.wait_workers(2, 2)
    wait_http(svc.base + "/health", svc.procs["gateway"])
    _every_pair(svc, reference)
    assert _pulled(svc, "decode-0", "nixl") > 0 and _pulled(svc, "decode-1", "grpc") > 0
    assert _staged_reads(svc, "decode-0") > 0  # TP 2 -> TP 1: both ranks packed, landed in rank 0's heads
    _staging_idle(svc)
