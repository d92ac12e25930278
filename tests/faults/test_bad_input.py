"""Bad input gets the right status and an OpenAI error body, the mesh keeps serving, nothing
leaks; property-based fuzzing of the request schema finds no 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.client import API_KEY, Tally, nothing_lost
from tests.meshproc import gateway_books, scrape

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
OK_BODY = {"prompt": "The sky is", "max_tokens": 3, "temperature": 0}

CASES = [
    # (id, path, raw body, headers, status, param or code)
    ("malformed-json", "/v1/completions", b'{"prompt": "x", ', AUTH, 400, None),
    ("non-object", "/v1/completions", b"[1, 2, 3]", AUTH, 400, None),
    ("string-body", "/v1/chat/completions", b'"hello"', AUTH, 400, None),
    ("prompt-wrong-type", "/v1/completions", json.dumps({"prompt": 5}).encode(), AUTH, 400, "prompt"),
    ("messages-wrong-type", "/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), AUTH, 400, "messages"),
    ("max-tokens-string", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": "8"}).encode(), AUTH, 400, "max_tokens"),
    ("max-tokens-negative", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": -1}).encode(), AUTH, 400, "max_tokens"),
    ("max-tokens-huge", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(), AUTH, 400, None),
    ("temperature-negative", "/v1/completions", json.dumps({"prompt": "x", "temperature": -0.5}).encode(), AUTH, 400, "temperature"),
    ("temperature-nan", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', AUTH, 400, None),
    ("n-too-large", "/v1/completions", json.dumps({"prompt": "x", "n": 5}).encode(), AUTH, 400, "n"),
    ("too-many-stops", "/v1/completions", json.dumps({"prompt": "x", "stop": list("abcde")}).encode(), AUTH, 400, "stop"),
    ("prompt-over-context", "/v1/completions", json.dumps({"prompt": [1] * 9000, "max_tokens": 1}).encode(), AUTH, 400,
     "context_length_exceeded"),
    ("token-id-out-of-vocab", "/v1/completions", json.dumps({"prompt": [1, 10**7]}).encode(), AUTH, 400, "prompt"),
    ("unknown-model", "/v1/completions", json.dumps({"model": "gpt-nope", "prompt": "x"}).encode(), AUTH, 404,
     "model_not_found"),
    ("missing-key", "/v1/completions", json.dumps(OK_BODY).encode(), {"Content-Type": "application/json"}, 401,
     "invalid_api_key"),
    ("wrong-key", "/v1/completions", json.dumps(OK_BODY).encode(), {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("models-without-key", "/v1/models", None, {}, 401, "invalid_api_key"),
    ("oversized-body", "/v1/completions", json.dumps({"prompt": "x" * 70000}).encode(), AUTH, 413, "request_too_large"),
    ("invalid-utf8", "/v1/completions", b'{"prompt": "caf\xc3\x28 \xff"}', AUTH, 400, None),
    ("nul-escaped", "/v1/completions", b'{"prompt": "a\\u0000b"}', AUTH, 400, "prompt"),
    ("nul-raw-byte", "/v1/completions", b'{"prompt": "a\x00b"}', AUTH, 400, None),
    ("lone-surrogate", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', AUTH, 400,
     "messages"),
]


def _check_error(r: httpx.Response, status: int, want) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if want is not None:
        assert want in (err.get("param"), err.get("code")), err


def test_bad_inputs_get_their_status_and_the_mesh_keeps_serving(shared, report):
    before = gateway_books(shared.metrics_url("gateway"))
    tally = Tally()
    with httpx.Client(base_url=shared.base, timeout=30) as c:
        for _name, path, raw, headers, status, want in CASES:
            tally.sent += 1 if path != "/v1/models" else 0
            r = c.get(path, headers=headers) if raw is None else c.post(path, content=raw, headers=headers)
            _check_error(r, status, want)
            if path != "/v1/models":
                tally.outcomes.append(_outcome(r))
            # the mesh keeps serving after each one
            ok = c.post("/v1/completions", json=OK_BODY, headers=AUTH)
            assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length", ok.text
            tally.sent += 1
            tally.outcomes.append(_outcome(ok))
        assert c.get("/health").status_code == 200  # no key needed there
        assert c.get("/v1/completions", headers=AUTH).status_code == 405
    # 401s are refused before the gateway counts a request
    unauth = sum(1 for case in CASES if case[4] == 401 and case[1] != "/v1/models")
    tally.sent -= unauth
    tally.outcomes = [o for o in tally.outcomes if o.status != 401]
    leaked = nothing_lost(shared.scheduler, shared.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("bad_input", tally, faults_injected=len(CASES), blocks_leaked=leaked)


def _outcome(r: httpx.Response):
    from tests.faults.client import Outcome

    return Outcome("ok" if r.status_code == 200 else "error", r.status_code)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8)
BAD_MAX = st.one_of(st.integers(-3, 0), st.integers(2**31, 2**62), st.floats(allow_nan=False), st.text(max_size=3),
                    st.none(), st.booleans())
VALID = {
    "model": st.just("SmolLM2-135M-Instruct"), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 100), "min_p": st.floats(0, 1), "n": st.integers(1, 4),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(min_size=1, max_size=5), max_size=4)),
    "seed": st.integers(0, 2**63 - 1), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "min_tokens": st.integers(0, 4), "ignore_eos": st.booleans(),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.one_of(st.booleans(), st.integers(0, 5)), "top_logprobs": st.integers(0, 5), "user": st.text(max_size=8),
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=30)})
PROMPT = st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 49151), min_size=1, max_size=20),
                   st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3))


@st.composite
def request_bodies(draw):
    """Mostly-valid requests with 0-2 fields replaced by arbitrary JSON (of any key, known or not)."""
    kind = draw(st.sampled_from(["chat", "completion"]))
    body = draw(st.fixed_dictionaries({}, optional=VALID))
    body[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = draw(st.integers(1, 4))
    if kind == "chat":
        body["messages"] = draw(st.lists(MESSAGE, min_size=1, max_size=3))
    else:
        body["prompt"] = draw(PROMPT)
    keys = sorted(VALID) + ["max_tokens", "messages", "prompt", "logit_bias", "echo", "chat_template_kwargs"]
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.one_of(st.sampled_from(keys), st.text(max_size=6)))
        body[key] = draw(BAD_MAX) if key in ("max_tokens", "max_completion_tokens") else draw(JSON)
    return kind, body


@pytest.mark.timeout(600)
def test_fuzzed_request_bodies_never_get_a_5xx(shared, report):
    before = gateway_books(shared.metrics_url("gateway"))
    tally = Tally()
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=shared.base, timeout=60, headers=AUTH) as c:

        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(request_bodies())
        def check(case):
            kind, body = case
            path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
            tally.sent += 1
            r = c.post(path, content=json.dumps(body).encode())
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            tally.outcomes.append(_outcome(r))
            assert r.status_code < 500, (body, r.status_code, r.text[:300])
            if r.status_code != 200:
                err = r.json()["error"]
                assert isinstance(err["message"], str) and err["message"], r.text
            elif not body.get("stream"):
                assert r.json()["choices"], r.text

        check()
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0, statuses
    leaked = nothing_lost(shared.scheduler, shared.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("fuzzed_requests", tally, faults_injected=sum(v for k, v in statuses.items() if k >= 400),
               blocks_leaked=leaked, statuses={str(k): v for k, v in sorted(statuses.items())})


def test_client_gone_before_its_body_arrives_is_counted(shared):
    """A client that sends the headers and part of the body, then hangs up: the gateway counts it
    received and refused (499), never left out of the books."""
    import socket
    import time
    from urllib.parse import urlsplit

    before = gateway_books(shared.metrics_url("gateway"))
    u = urlsplit(shared.base)
    body = json.dumps(OK_BODY).encode()
    for _ in range(3):
        with socket.create_connection((u.hostname, u.port), timeout=5) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                      + f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n".encode()
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
            time.sleep(0.3)  # the gateway is now waiting on the rest of the body
    deadline = time.monotonic() + 5
    while True:
        d = {k: v - before[k] for k, v in gateway_books(shared.metrics_url("gateway")).items()}
        if d["received"] == 3 and d["rejected"] == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert d["received"] == 3 and d["rejected"] == 3 and d["ok"] + d["failed"] + d["aborted"] == 0, d
    m = scrape(shared.metrics_url("gateway"))
    assert m.get('pdmesh:requests_rejected_total{status="499"}', 0) >= 3, {k: v for k, v in m.items() if "rejected" in k}
