"""One request -> one trace across gateway, scheduler, prefill, KV transfer and decode, exported by
every process over OTLP/gRPC to a receiver in this test; token events count the completion tokens."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.meshproc import Mesh, OtlpReceiver

MODEL = "SmolLM2-135M-Instruct"
TRACE = "0af7651916cd43dd8448eb211c80319c"
SECRET = "the purple elephant sings at midnight"


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        kind = v.WhichOneof("value")
        out[a.key] = [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


@pytest.fixture(scope="module")
def traced(tmp_path_factory, embedded_dir):
    rec = OtlpReceiver()
    mesh = Mesh(tmp_path_factory.mktemp("traced"), env=rec.env)
    yield mesh, rec
    assert mesh.stop() == 0
    rec.stop()


def test_one_trace_across_all_services_with_token_events(traced):
    mesh, rec = traced
    r = httpx.post(mesh.base + "/v1/chat/completions", timeout=60,
                   headers={"traceparent": f"00-{TRACE}-b7ad6b7169203331-01"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 8,
                         "temperature": 0.5, "top_p": 0.9, "ignore_eos": True})
    assert r.status_code == 200
    usage = r.json()["usage"]
    deadline = time.monotonic() + 20
    want = {("pdmesh-gateway", "chat " + MODEL), ("pdmesh-scheduler", "pdmesh.route"), ("pdmesh-prefill", "pdmesh.prefill"),
            ("pdmesh-decode", "pdmesh.kv_transfer"), ("pdmesh-decode", "pdmesh.decode")}
    while time.monotonic() < deadline:
        with rec.lock:
            mine = [(svc, s) for svc, s in rec.spans if s.trace_id.hex() == TRACE]
        if want <= {(svc, s.name) for svc, s in mine}:
            break
        time.sleep(0.2)
    got = {(svc, s.name): s for svc, s in mine}
    assert want <= set(got), sorted(got)
    gw = got[("pdmesh-gateway", "chat " + MODEL)]
    a = attrs(gw)
    assert gw.parent_span_id.hex() == "b7ad6b7169203331"  # the incoming traceparent is honoured
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.request.max_tokens"] == 8 and abs(a["gen_ai.request.temperature"] - 0.5) < 1e-9
    assert abs(a["gen_ai.request.top_p"] - 0.9) < 1e-9 and a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] and a["gen_ai.usage.output_tokens"] == 8
    # every service's span hangs off the gateway's span (route, prefill, decode) or decode's (transfer)
    for key in (("pdmesh-scheduler", "pdmesh.route"), ("pdmesh-prefill", "pdmesh.prefill"), ("pdmesh-decode", "pdmesh.decode")):
        assert got[key].parent_span_id == gw.span_id, key
    assert got[("pdmesh-decode", "pdmesh.kv_transfer")].parent_span_id == got[("pdmesh-decode", "pdmesh.decode")].span_id
    route = attrs(got[("pdmesh-scheduler", "pdmesh.route")])
    assert route["pdmesh.route.prefill_worker"].startswith("prefill") and "least_loaded" in route["pdmesh.route.reason"]
    pre = attrs(got[("pdmesh-prefill", "pdmesh.prefill")])
    assert pre["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] and "pdmesh.prefill.compute_seconds" in pre
    assert "pdmesh.prefill.queue_seconds" in pre and "pdmesh.prefill.cached_tokens" in pre
    kv = attrs(got[("pdmesh-decode", "pdmesh.kv_transfer")])
    assert kv["pdmesh.kv.transport"] == "grpc" and kv["pdmesh.kv.bytes"] > 0 and kv["pdmesh.kv.blocks"] >= 1
    assert kv["pdmesh.kv.gbps"] > 0 and kv["pdmesh.kv.seconds"] > 0
    dec = got[("pdmesh-decode", "pdmesh.decode")]
    assert attrs(dec)["gen_ai.response.finish_reasons"] == ["length"]
    # the token path: one event per token on the gateway span; prefill made token 0, decode the rest
    tok = lambda s: [e for e in s.events if e.name == "gen_ai.token"]  # noqa: E731
    assert len(tok(gw)) == usage["completion_tokens"] == 8
    assert len(tok(got[("pdmesh-prefill", "pdmesh.prefill")])) + len(tok(dec)) == 8
    assert any(e.name == "first_token" for e in dec.events)
    # prompt and completion text never go into spans by default
    for _, s in mine:
        assert all(SECRET not in str(v) for v in attrs(s).values())
