"""Tool calls and structured outputs through the running mesh, with the ``openai`` SDK (and the
gRPC API): arguments always parse and obey their schemas (named, required, streamed), a tool
result turn, the hermes parser, json_schema obeyed greedy and sampled (streamed too), an invalid
schema is a 400, and a constrained request gives the same output disaggregated and colocated."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from pdmesh.client import InferenceClient, collect
from tests.e2e.conftest import KEYS, MODEL
from tests.meshproc import scrape, wait_http

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "maxLength": 16},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}
TIME = {"name": "get_time", "description": "Get the current time in a time zone",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                       "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
SCHEMAS = {"get_weather": WEATHER["parameters"], "get_time": TIME["parameters"]}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country", "capital"],
        "properties": {"city": {"type": "string", "maxLength": 24},
                       "country": {"type": "string", "enum": ["France", "Germany", "Italy", "Spain"]},
                       "capital": {"type": "boolean"}}}
CITY_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
DESCRIBE = [{"role": "user", "content": "Describe Paris as a JSON object."}]


@pytest.fixture(scope="module")
def client(features):
    return openai.OpenAI(base_url=features.base + "/v1", api_key=KEYS[0], max_retries=0, timeout=180)


def valid_calls(message) -> list[tuple[str, dict]]:
    out = []
    for call in message.tool_calls:
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        assert call.type == "function" and call.id.startswith("call_")
        out.append((call.function.name, args))
    return out


def streamed_calls(chunks) -> tuple[dict[int, dict], list[str]]:
    """Tool-call deltas joined per index (OpenAI's streaming shape checked), and the finish reasons."""
    calls: dict[int, dict] = {}
    finishes = []
    for ch in chunks:
        for c in ch.choices:
            for d in c.delta.tool_calls or ():
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name, d  # the first delta names the call
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    return calls, finishes


def test_named_tool_call_has_valid_arguments(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert [name for name, _ in valid_calls(c.message)] == ["get_weather"]


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=0.8, seed=8, n=2)])
def test_required_tool_call_is_valid_greedy_and_sampled(client, kw):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80,
                                       parallel_tool_calls=False, **kw)
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        assert len(valid_calls(c.message)) == 1  # parallel_tool_calls false: exactly one


def test_parallel_required_calls_are_each_valid(client):
    # SmolLM2-135M keeps adding calls until max_tokens: every call returned is complete and valid
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=100,
                                       temperature=1.0, seed=3)
    c = r.choices[0]
    assert c.finish_reason in ("tool_calls", "length") and len(valid_calls(c.message)) >= 2


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_calls_join_into_the_same_valid_calls(client, choice):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What time is it in Berlin?"}], tools=TOOLS,
              tool_choice=choice, max_tokens=80, temperature=0.9, seed=21, parallel_tool_calls=False)
    full = client.chat.completions.create(**kw)
    calls, finishes = streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert finishes == ["tool_calls"]
    want = [(t.function.name, t.function.arguments) for t in full.choices[0].message.tool_calls]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == want
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_a_tool_result_turn(client, features):
    call = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    tc = call.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": tc.function.arguments}}]},
        {"role": "tool", "tool_call_id": tc.id, "content": "It is 18 degrees and sunny."}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=40,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    # what the model saw: its call and the result, in the hermes format (SmolLM2's template has no tools)
    ids = httpx.post(features.base + "/tokenize", json={"messages": history}, timeout=30,
                     headers={"Authorization": f"Bearer {KEYS[0]}"}).json()["tokens"]
    seen = httpx.post(features.base + "/detokenize", json={"tokens": ids}, timeout=30,
                      headers={"Authorization": f"Bearer {KEYS[0]}"}).json()["prompt"]
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {tc.function.arguments}}}\n</tool_call>' in seen
    assert "<tool_response>\nIt is 18 degrees and sunny.\n</tool_response>" in seen
    assert r.usage.prompt_tokens == len(ids)


HERMES_CALL = ('root ::= "<tool_call>\\n{\\"name\\": \\"get_time\\", \\"arguments\\": {\\"zone\\": \\"" '
               '("UTC" | "CET") "\\"}}\\n</tool_call>"')


def test_auto_tool_choice_reads_hermes_calls(client):
    # the model's text is held to a hermes-format call by a grammar; the hermes parser must read it
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What time is it in Berlin?"}], tools=TOOLS,
              tool_choice="auto", max_tokens=60, temperature=0, extra_body={"guided_grammar": HERMES_CALL})
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and not c.message.content
    assert [name for name, _ in valid_calls(c.message)] == ["get_time"]
    calls, finishes = streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert finishes == ["tool_calls"] and calls[0]["arguments"] == c.message.tool_calls[0].function.arguments


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, seed=4), dict(temperature=1.2, top_p=0.9, seed=9, n=3)])
def test_json_schema_is_obeyed(client, kw):
    r = client.chat.completions.create(model=MODEL, messages=DESCRIBE, response_format=CITY_FORMAT, max_tokens=80, **kw)
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), CITY)


def test_json_schema_streamed_equals_whole(client):
    kw = dict(model=MODEL, messages=DESCRIBE, response_format=CITY_FORMAT, max_tokens=80, temperature=1.0, seed=12)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(**kw, stream=True) if ch.choices)
    assert text == whole
    jsonschema.validate(json.loads(text), CITY)


def test_vllm_guided_fields_and_json_object(client):
    r = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    alice = [{"role": "user", "content": 'Return a JSON object with the keys "name" and "age" for Alice, who is 30.'}]
    r = client.chat.completions.create(model=MODEL, messages=alice, max_tokens=60, temperature=0.7, seed=1,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="A US phone number:", max_tokens=20, temperature=0.5, seed=2,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    t = r.choices[0].text
    assert len(t) == 8 and t[3] == "-" and (t[:3] + t[4:]).isdigit()


@pytest.mark.parametrize("fmt,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}, "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 5}}}],
      "tool_choice": "required"}, "tools"),
])
def test_invalid_schema_is_400(client, fmt, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=DESCRIBE, max_tokens=10, **fmt)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_grpc_api_tool_calls_and_structured_output(features):
    with InferenceClient(f"127.0.0.1:{features.grpc_port}", api_key=KEYS[1], timeout=180) as g:
        r = collect(g.chat(ASK, model=MODEL, tools=[WEATHER, TIME], tool_choice="required", max_tokens=100,
                           temperature=1.0, seed=3, parallel_tool_calls=False))
        assert r.finish_reason == "tool_calls" and r.tool_calls
        for c in r.tool_calls:
            jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
        r = collect(g.chat(DESCRIBE, model=MODEL, max_tokens=80, temperature=0,
                           structured_output={"json_schema": json.dumps(CITY)}))
        jsonschema.validate(json.loads(r.text), CITY)


def ready(features) -> None:
    """Until every worker has registered with the (restarted) scheduler and the gateway serves."""
    features.wait_workers(1, 1, both=1)
    wait_http(features.base + "/health", features.procs["gateway"], timeout=30)


def _both_worker_requests(features) -> float:
    return scrape(features.metrics_url("both-0")).get("pdmesh:request_success_total", 0.0)


def test_disaggregated_and_colocated_give_the_same_constrained_output(client, features):
    cases = [dict(messages=DESCRIBE, response_format=CITY_FORMAT, temperature=1.0, seed=s) for s in (1, 2)]
    cases += [dict(messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.9, seed=7, parallel_tool_calls=False)]

    def answers():
        out = []
        for kw in cases:
            m = client.chat.completions.create(model=MODEL, max_tokens=100, **kw).choices[0].message
            out.append(m.content if m.content is not None else [(t.function.name, t.function.arguments) for t in m.tool_calls])
        return out

    before = _both_worker_requests(features)
    disaggregated = answers()
    assert _both_worker_requests(features) == before  # all went through the prefill/decode pair
    features.stop("scheduler")
    features.start("scheduler", ("--colocate-below-tokens", "100000"))  # now every prompt goes colocated
    try:
        ready(features)
        colocated = answers()
        assert _both_worker_requests(features) == before + len(cases)
    finally:
        features.stop("scheduler")
        features.start("scheduler")  # back to --colocate-below-tokens 0 for the other tests
        ready(features)
    assert colocated == disaggregated
    jsonschema.validate(json.loads(disaggregated[0]), CITY)
