"""OpenAI request validation: each bad input gets a 400 naming its field."""

import json

import pytest

from pdmesh.openai.errors import APIError
from pdmesh.openai.protocol import RequestPolicy, finalize_max_tokens, parse_json_body, parse_request

LIM = RequestPolicy(max_model_len=1000, max_n=4, max_stop=3, vocab_size=500)


def parse(raw, kind="chat", policy=LIM):
    """What the HTTP front end does: JSON body -> dict -> validated request."""
    return parse_request(parse_json_body(raw), kind, policy)


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return json.dumps(body).encode()


def err(raw, kind="chat"):
    with pytest.raises(APIError) as e:
        parse(raw, kind)
    return e.value


def test_valid_chat_defaults():
    r = parse(chat(), "chat", LIM)
    assert r.params.temperature == 1.0 and not r.max_tokens_given and r.params.n == 1
    p = finalize_max_tokens(r, 10, 1000)
    assert p.max_tokens == 990


def test_valid_completion_forms():
    for prompt in ["x", ["a", "b"], [1, 2, 3], [[1, 2], [3]]]:
        r = parse(json.dumps({"prompt": prompt}).encode(), "completion", LIM)
        assert r.prompts and r.kind == "completion"
    r = parse(json.dumps({"prompt": "x", "logprobs": 2}).encode(), "completion", LIM)
    assert r.params.logprobs == 2


@pytest.mark.parametrize("raw,param", [
    (b"{not json", None),
    (b"[1,2]", None),
    (b"\xff\xfe", None),
    (chat(max_tokens=-1), "max_tokens"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=10**9), "max_tokens"),
    (chat(max_tokens="5"), "max_tokens"),
    (chat(max_tokens=True), "max_tokens"),
    (chat(temperature=-0.5), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(n=5), "n"),
    (chat(stop=["a", "b", "c", "d"]), "stop"),
    (chat(stop=[1]), "stop"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages"),
    (chat(messages=[{"role": "user", "content": "a\u0000b"}]), "messages"),
    (chat(messages="hi"), "messages"),
    (chat(top_logprobs=3), "top_logprobs"),
    (chat(stream="yes"), "stream"),
    (chat(seed=1.5), "seed"),
    (chat(presence_penalty=3), "presence_penalty"),
])
def test_bad_chat_inputs(raw, param):
    e = err(raw)
    assert e.status == 400 and e.param == param
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_bad_completion_prompts():
    assert err(json.dumps({"prompt": ""}).encode(), "completion").param == "prompt"
    assert err(json.dumps({"prompt": [1, "a"]}).encode(), "completion").param == "prompt"
    assert err(json.dumps({"prompt": [999]}).encode(), "completion").param == "prompt"
    assert err(json.dumps({}).encode(), "completion").param == "prompt"


def test_context_length_exceeded():
    r = parse(chat(max_tokens=100), "chat", LIM)
    with pytest.raises(APIError) as e:
        finalize_max_tokens(r, 950, 1000)
    assert e.value.code == "context_length_exceeded" and e.value.status == 400
    with pytest.raises(APIError):
        finalize_max_tokens(parse(chat(), "chat", LIM), 1000, 1000)


def test_unknown_fields_ignored_and_reported():
    r = parse(chat(frobnicate=1, user="u"), "chat", LIM)
    assert r.kind == "chat" and r.ignored_fields == ("frobnicate",)


def test_content_parts_and_developer_role():
    r = parse(chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]), "chat", LIM)
    assert r.messages == [{"role": "system", "content": "ab"}]



# ---------------------------------------------------------------------- every field honest

@pytest.mark.parametrize("kind,field,value", [
    ("completion", "suffix", "tail"),
    ("completion", "best_of", 3),
    ("chat", "functions", [{"name": "f"}]),
    ("chat", "function_call", "auto"),
    ("chat", "audio", {"voice": "alloy"}),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "prediction", {"type": "content", "content": "x"}),
    ("chat", "store", True),
    ("chat", "reasoning_effort", "low"),
    ("chat", "web_search_options", {}),
    ("chat", "service_tier", "flex"),
    ("chat", "use_beam_search", True),
    ("chat", "allowed_token_ids", [1, 2]),
    ("chat", "bad_words", ["x"]),
    ("chat", "logits_processors", ["a"]),
    ("chat", "guided_decoding_backend", "outlines"),
    ("chat", "chat_template", "{{ x }}"),
    ("completion", "truncate_prompt_tokens", 5),
])
def test_refused_fields_get_400_naming_them(kind, field, value):
    body = {"prompt": "x"} if kind == "completion" else {"messages": [{"role": "user", "content": "hi"}]}
    e = err(json.dumps(dict(body, **{field: value})).encode(), kind)
    assert e.status == 400 and e.param == field and e.code == "unsupported_parameter", e.message


@pytest.mark.parametrize("kind,field,value", [
    ("completion", "best_of", 1), ("completion", "suffix", ""), ("chat", "store", False),
    ("chat", "modalities", ["text"]), ("chat", "service_tier", "auto"), ("chat", "user", "u1"),
    ("chat", "metadata", {"a": "b"}), ("completion", "guided_decoding_backend", "xgrammar"),
])
def test_harmless_values_of_refused_fields_pass(kind, field, value):
    body = {"prompt": "x"} if kind == "completion" else {"messages": [{"role": "user", "content": "hi"}]}
    assert parse(json.dumps(dict(body, **{field: value})).encode(), kind).ignored_fields == ()


def test_image_parts_are_refused_not_dropped():
    e = err(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                        {"type": "image_url", "image_url": {"url": "http://x"}}]}]))
    assert e.param == "messages" and "image_url" in e.message and e.code == "unsupported_parameter"


def test_logit_bias_stop_token_ids_and_stream_options():
    r = parse(chat(logit_bias={"7": 5, "3": -100}, stop_token_ids=[4, 9], stream=True,
                   stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert r.params.logit_bias == ((3, -100.0), (7, 5.0)) and r.params.stop_token_ids == (4, 9)
    assert r.include_usage and r.continuous_usage
    for bad_bias in ({"x": 1}, {"7": 101}, {"600": 1}, {"7": "a"}, [1]):
        assert err(chat(logit_bias=bad_bias)).param == "logit_bias"
    assert err(chat(stop_token_ids=[500])).param == "stop_token_ids"
    assert err(chat(stream_options={"include_usage": True})).param == "stream_options"  # needs stream


def test_echo_and_prompt_logprobs():
    r = parse(json.dumps({"prompt": "x", "echo": True, "logprobs": 2}).encode(), "completion")
    assert r.echo and r.echo_logprobs and r.params.prompt_logprobs == 2 and not r.prompt_logprobs_field
    r = parse(chat(prompt_logprobs=1))
    assert r.params.prompt_logprobs == 1 and r.prompt_logprobs_field
    assert err(chat(prompt_logprobs=1, stream=True)).param == "prompt_logprobs"
    assert err(chat(prompt_logprobs=21)).param == "prompt_logprobs"


def test_generation_config_defaults_fill_unset_fields():
    pol = RequestPolicy(max_model_len=1000, sampling_defaults={"temperature": 0.3, "top_k": 20, "max_tokens": 50})
    r = parse(chat(), policy=pol)
    assert r.params.temperature == 0.3 and r.params.top_k == 20 and not r.max_tokens_given
    assert finalize_max_tokens(r, 10, 1000).max_tokens == 50
    assert finalize_max_tokens(r, 980, 1000).max_tokens == 20
    r = parse(chat(temperature=1.5, max_tokens=7), policy=pol)
    assert r.params.temperature == 1.5 and r.params.max_tokens == 7


# ---------------------------------------------------------------------- structured outputs

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("fields,kind", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}}, "json_schema"),
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"guided_json": SCHEMA}, "json_schema"),
    ({"guided_json": json.dumps(SCHEMA)}, "json_schema"),
    ({"guided_regex": "[a-z]+"}, "regex"),
    ({"guided_choice": ["a", "b"]}, "choice"),
    ({"guided_grammar": 'root ::= "a" | "b"'}, "ebnf"),
    ({"structured_outputs": {"json": SCHEMA}}, "json_schema"),
    ({"structured_outputs": {"choice": ["x"]}}, "choice"),
])
def test_structured_output_fields(fields, kind):
    r = parse(chat(**fields))
    assert r.params.grammar is not None and r.params.grammar.kind == kind
    assert parse(chat(response_format={"type": "text"})).params.grammar is None


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "structural_tag"}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a", "min_tokens": 2}, "min_tokens"),
    ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos"),
])
def test_bad_structured_outputs_are_400(fields, param):
    assert err(chat(**fields)).param == param


# ---------------------------------------------------------------------- tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
AUTO = RequestPolicy(max_model_len=1000, tool_call_parser="hermes", enable_auto_tool_choice=True)


def test_tool_choice_modes():
    r = parse(chat(tools=[WEATHER, TIME], tool_choice="required"))
    assert r.tools.mode == "required" and r.params.grammar.kind == "json_schema"
    schema = json.loads(r.params.grammar.value)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    r = parse(chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False))
    assert json.loads(r.params.grammar.value)["maxItems"] == 1
    r = parse(chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert r.tools.mode == "named" and json.loads(r.params.grammar.value) == WEATHER["function"]["parameters"]
    r = parse(chat(tools=[WEATHER], tool_choice="none"))
    assert r.tools.mode == "none" and r.params.grammar is None and not r.tools.rendered
    assert parse(chat(tools=[WEATHER]), policy=AUTO).tools.mode == "auto"


@pytest.mark.parametrize("fields,param,policy", [
    ({"tools": [WEATHER]}, "tool_choice", LIM),  # auto without --enable-auto-tool-choice
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", LIM),
    ({"tool_choice": "required"}, "tool_choice", LIM),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", LIM),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", LIM),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", AUTO),
    ({"tools": [{"type": "retrieval"}]}, "tools", AUTO),
    ({"tools": [WEATHER, WEATHER]}, "tools", AUTO),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools", AUTO),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", LIM),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", AUTO),
])
def test_bad_tool_requests(fields, param, policy):
    with pytest.raises(APIError) as e:
        parse(chat(**fields), policy=policy)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_tool_history_messages():
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}]
    r = parse(chat(messages=msgs, tools=[WEATHER], tool_choice="none"))
    assert r.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather" and r.messages[2]["tool_call_id"] == "call_1"
    assert err(chat(messages=[{"role": "tool", "content": "x"}])).param == "messages"  # no tool_call_id
    call = msgs[1]["tool_calls"]
    assert err(chat(messages=[{"role": "user", "content": "x", "tool_calls": call}])).param == "messages"
    bad_call = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {"not": "text"}}}]
    assert err(chat(messages=[{"role": "assistant", "content": None, "tool_calls": bad_call}])).param == "messages"


def test_continue_final_message():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
    r = parse(chat(messages=msgs, continue_final_message=True, add_generation_prompt=False))
    assert r.continue_final_message and not r.add_generation_prompt
    assert err(chat(messages=msgs, continue_final_message=True)).param == "continue_final_message"


def test_readme_shows_the_field_table():
    from pathlib import Path

    from pdmesh.openai.fields import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "README's request-field table differs from pdmesh/openai/fields.py"
