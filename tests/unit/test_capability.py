"""KV capabilities (``pdmesh.transport.capability``) and the lease table's hard limit: a lease token
grants pulls of its own prompt's KV to one decode identity, releases to that identity or the
request's gateway, nothing past the lease's hard limit; decode refuses descriptors whose prompt
hash or token count is not its prompt's."""

from __future__ import annotations

import pytest

from pdmesh.transport.capability import (authorize_pull, authorize_release, check_descriptor, new_token,
                                         prompt_hash)
from pdmesh.transport.lease import LeaseTable

PROMPT = list(range(100, 140))


@pytest.fixture
def lease():
    freed: list[str] = []
    table = LeaseTable(freed.append, ttl=5.0, max_ttl=12.0)
    lz = table.add("r1", [3, 4], len(PROMPT), prompt_hash=prompt_hash(PROMPT))
    return lz, table, freed


def test_tokens_are_long_and_unique():
    toks = {new_token() for _ in range(1000)}
    assert len(toks) == 1000 and min(len(t) for t in toks) >= 43  # 256 bits, URL-safe base64


def test_prompt_hash_is_of_the_exact_tokens():
    assert prompt_hash(PROMPT) == prompt_hash(tuple(PROMPT)) and len(prompt_hash(PROMPT)) == 32
    assert prompt_hash(PROMPT) != prompt_hash(PROMPT[:-1]) != prompt_hash(PROMPT[:-1] + [7])


def test_pull_needs_the_token_and_the_leases_prompt_and_binds_the_first_puller(lease):
    lz, _, _ = lease
    h = prompt_hash(PROMPT)
    assert authorize_pull(lz, "forged", len(PROMPT), h, "decode/a") == "the lease token does not match"
    assert authorize_pull(lz, "", len(PROMPT), h, "decode/a") == "the lease token does not match"
    assert "another prompt" in authorize_pull(lz, lz.token, len(PROMPT) - 1, h, "decode/a")
    assert "another prompt" in authorize_pull(lz, lz.token, len(PROMPT), prompt_hash(PROMPT[::-1]), "decode/a")
    assert lz.holder is None  # refusals bind nobody
    assert authorize_pull(lz, lz.token, len(PROMPT), h, "decode/a") is None and lz.holder == "decode/a"
    assert authorize_pull(lz, lz.token, len(PROMPT), h, "decode/a") is None  # the holder again: fine
    assert authorize_pull(lz, lz.token, len(PROMPT), h, "decode/b") == "the lease is held by another decode worker"


def test_release_needs_the_token_and_the_holder_or_the_requests_gateway(lease):
    lz, _, _ = lease
    assert authorize_release(lz, "forged", "gateway/g", "gateway/g") == "the lease token does not match"
    assert authorize_release(lz, lz.token, "decode/x", "gateway/g") is None  # no holder yet: a decode refusing it
    authorize_pull(lz, lz.token, len(PROMPT), prompt_hash(PROMPT), "decode/a")
    assert authorize_release(lz, lz.token, "decode/x", "gateway/g") == "the lease is held by another decode worker"
    assert authorize_release(lz, lz.token, "decode/a", "gateway/g") is None
    assert authorize_release(lz, lz.token, "gateway/g", "gateway/g") is None


def test_descriptor_checks():
    assert check_descriptor(len(PROMPT), prompt_hash(PROMPT), PROMPT) is None
    assert "40" in check_descriptor(41, prompt_hash(PROMPT), PROMPT)
    assert "prompt hash" in check_descriptor(len(PROMPT), prompt_hash(PROMPT[1:] + [0]), PROMPT)
    assert "prompt hash" in check_descriptor(len(PROMPT), b"", PROMPT)


def test_pins_never_pass_the_hard_limit(lease, monkeypatch):
    lz, table, freed = lease
    t0 = lz.hard_deadline - 12.0
    clock = {"t": t0}
    monkeypatch.setattr("pdmesh.transport.lease.time.monotonic", lambda: clock["t"])
    for step in (4.0, 8.0, 11.0):  # pulls keep extending the soft deadline, never past the hard one
        clock["t"] = t0 + step
        assert table.pin("r1") is lz
        assert lz.deadline <= lz.hard_deadline
        table.unpin("r1")
    clock["t"] = t0 + 12.0
    assert table.pin("r1") is None  # past the hard limit: no new pull
    assert table.reap(clock["t"]) == 1 and freed == ["r1"]


def test_a_pinned_lease_ends_once_its_pull_stops_after_the_hard_limit(lease):
    lz, table, freed = lease
    assert table.pin("r1") is lz
    assert table.reap(lz.hard_deadline + 1) == 0 and not freed  # never freed under a reader...
    table.unpin("r1")  # ...the server ends a pull at the hard limit (KVTransfer.Pull runs under it)
    assert table.reap(lz.hard_deadline + 1) == 1 and freed == ["r1"]
