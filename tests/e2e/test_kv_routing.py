"""Routing by cached prefix with two prefill workers (real processes, the embedded model): the
scheduler (--routing kv-aware) sends prompts sharing a prefix to the worker whose KV tiers hold it,
from the hashes workers publish in their heartbeats; after a scheduler restart (every hint lost)
workers send them again and routing goes on; a prefill worker stopped and started again (SIGTERM:
its host tier goes to disk) serves the prefix from its disk tier, counted as cached tokens, with the
same tokens."""

from __future__ import annotations

import httpx
import pytest

from tests.meshproc import Services, list_workers, scrape, wait_http, wait_until

BLOCK = 32
PREFIX = list(range(1000, 1000 + 6 * BLOCK + 5))  # 6 full blocks and a bit


def ask(base: str, suffix: list[int]) -> tuple[str, int]:
    """(completion text, cached prompt tokens) of one greedy completion of PREFIX + suffix."""
    r = httpx.post(base + "/v1/completions", timeout=120, json={
        "prompt": PREFIX + suffix, "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def holder(svc: Services, min_hashes: int = 6) -> str:
    """The prefill worker the scheduler knows to hold PREFIX's blocks (waits for its heartbeat)."""
    def find():
        for w in list_workers(svc.scheduler):
            if w.info.role == 1 and sum(w.kv_hashes.values()) >= min_hashes:
                return w.info.worker_id
        return None
    return wait_until(find, 15, "a prefill worker's prefix hashes reach the scheduler")


def tiers(tmp, i: int) -> tuple[str, ...]:
    return ("--kv-offload-cpu-gb", "0.05", "--kv-offload-disk-path", str(tmp / f"kv-{i}"), "--kv-offload-disk-gb", "0.1")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kvroute")
    svc = Services(tmp, prefill=0, decode=1, scheduler_args=("--routing", "kv-aware"),
                   workers=(("prefill-0", tiers(tmp, 0)), ("prefill-1", tiers(tmp, 1))))
    svc.kv_tmp = tmp
    svc.wait_workers(2, 1)
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


def name_of(svc: Services, worker_id: str) -> str:
    return next(n for n in ("prefill-0", "prefill-1") if worker_id.endswith(f"-{svc.ports[n][0]}"))


def prefix_hits(svc: Services, name: str) -> float:
    return scrape(svc.metrics_url(name)).get("pdmesh:prefix_cache_hits_total", 0.0) + \
        scrape(svc.metrics_url(name)).get("pdmesh:kv_tier_hits_total", 0.0)


def test_kv_aware_sends_a_shared_prefix_where_it_is_cached(mesh):
    first, cached = ask(mesh.base, [7, 8, 9])
    assert cached == 0
    other = "prefill-1" if name_of(mesh, holder(mesh)) == "prefill-0" else "prefill-0"
    before = prefix_hits(mesh, other)
    for i in range(4):  # same prefix, other suffixes: each goes where the prefix is
        _, cached = ask(mesh.base, [20 + i, 30 + i])
        assert cached >= 6 * BLOCK, i
    assert prefix_hits(mesh, other) == before  # the other worker computed none of them
    again, cached = ask(mesh.base, [7, 8, 9])
    assert again == first and cached >= 6 * BLOCK


def test_routing_by_prefix_survives_a_scheduler_restart(mesh):
    ask(mesh.base, [11])
    holder(mesh)
    mesh.stop("scheduler")
    mesh.start("scheduler")
    mesh.wait_workers(2, 1)
    holder(mesh)  # hints sent again in full after the workers re-registered
    wait_http(mesh.base + "/health", mesh.procs["gateway"], timeout=30)

    def routed():  # the gateway reconnects to the scheduler (503 until then)
        try:
            return ask(mesh.base, [39])
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 503:
                raise
            return None
    assert wait_until(routed, 15, "the gateway routes again")[1] >= 6 * BLOCK
    for i in range(3):
        _, cached = ask(mesh.base, [40 + i])
        assert cached >= 6 * BLOCK, i


def test_a_restarted_prefill_worker_serves_the_prefix_from_its_disk_tier(mesh):
    text, _ = ask(mesh.base, [7, 8, 9])
    name = name_of(mesh, holder(mesh))
    i = int(name[-1])
    assert mesh.stop(name) == 0  # SIGTERM: what its host tier holds is written to disk
    mesh.start(name, tiers(mesh.kv_tmp, i))
    mesh.wait_registered(name)
    mesh.wait_workers(2, 1)
    assert name_of(mesh, holder(mesh)) == name  # its disk blocks, published on registration
    again, cached = ask(mesh.base, [7, 8, 9])
    assert again == text and cached == 6 * BLOCK  # nothing on its device or in host memory: all from disk
    m = wait_until(lambda: (lambda m: m if m.get('pdmesh:kv_tier_hits_total{tier="disk"}') else None)(
        scrape(mesh.metrics_url(name))), 5, "the worker's tier counters are refreshed")
    assert m['pdmesh:kv_tier_hits_total{tier="disk"}'] == 6 * BLOCK and m.get("pdmesh:prefix_cache_hits_total", 0) == 0
