"""OpenAI request validation: each bad input gets a 400 naming its field."""

import json

import pytest

from pdmesh.openai.protocol import APIError, Limits, finalize_max_tokens, parse_request

LIM = Limits(max_model_len=1000, max_n=4, max_stop=3, vocab_size=500)


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return json.dumps(body).encode()


def err(raw, kind="chat"):
    with pytest.raises(APIError) as e:
        parse_request(raw, kind, LIM)
    return e.value


def test_valid_chat_defaults():
    r = parse_request(chat(), "chat", LIM)
    assert r.params.temperature == 1.0 and not r.max_tokens_given and r.params.n == 1
    p = finalize_max_tokens(r, 10, 1000)
    assert p.max_tokens == 990


def test_valid_completion_forms():
    for prompt in ["x", ["a", "b"], [1, 2, 3], [[1, 2], [3]]]:
        r = parse_request(json.dumps({"prompt": prompt}).encode(), "completion", LIM)
        assert r.prompts and r.kind == "completion"
    r = parse_request(json.dumps({"prompt": "x", "logprobs": 2}).encode(), "completion", LIM)
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
    r = parse_request(chat(max_tokens=100), "chat", LIM)
    with pytest.raises(APIError) as e:
        finalize_max_tokens(r, 950, 1000)
    assert e.value.code == "context_length_exceeded" and e.value.status == 400
    with pytest.raises(APIError):
        finalize_max_tokens(parse_request(chat(), "chat", LIM), 1000, 1000)


def test_unknown_fields_ignored():
    r = parse_request(chat(frobnicate=1, user="u"), "chat", LIM)
    assert r.kind == "chat"


def test_content_parts_and_developer_role():
    r = parse_request(chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]), "chat", LIM)
    assert r.messages == [{"role": "system", "content": "ab"}]
