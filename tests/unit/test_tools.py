"""Tool calling: parsers give the same calls however the text is split into deltas, streamed
deltas join into the complete calls, and messages render through templates with and without
tool support."""

from __future__ import annotations

import json

import pytest

from pdmesh.openai.tool_parsers import HermesParser, Llama3JsonParser, NamedCall, RequiredCalls
from pdmesh.openai.tools import ToolRequest, ToolSpec, render_messages, template_knows_tools


def run(ex, text: str, cuts: list[int]):
    """Feed ``text`` split at ``cuts``; (content, {index: (id, name, joined arguments)}, calls)."""
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    content, joined = "", {}
    for p in pieces:
        c, deltas = ex.feed(p)
        content += c
        for d in deltas:
            if d.id is not None:
                assert d.index == len(joined), "a call's first delta carries its id and name, in order"
                joined[d.index] = [d.id, d.name, d.arguments]
            else:
                joined[d.index][2] += d.arguments
    c, deltas = ex.finish()
    content += c
    for d in deltas:
        joined[d.index] = [d.id, d.name, d.arguments] if d.id is not None else joined[d.index][:2] + [joined[d.index][2] + d.arguments]
    return content, joined, ex.calls


HERMES = ('I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
REQUIRED = '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris{", "n": [1, {"x": "]"}]}}, {"name": "get_time", "parameters": {}}]'


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_hermes_calls_and_content_whatever_the_split(step):
    content, joined, calls = run(HermesParser(), HERMES, list(range(step, len(HERMES), step)))
    assert content == "I will look it up.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "days": [1, 2]}),
                                                                  ("get_time", {})]
    assert [v[1:] for v in joined.values()] == [[c.name, c.arguments] for c in calls]


def test_hermes_keeps_what_is_not_a_call_as_content():
    text = "Look: <tool_ is not a tag, <tool_call>not json</tool_call> done"
    content, joined, calls = run(HermesParser(), text, list(range(1, len(text))))
    assert content == text and not joined and not calls
    content, _, calls = run(HermesParser(), '<tool_call>\n{"name": "f", "arguments": {"a": 1}}', [5])  # EOS before the end tag
    assert content == "" and calls[0].name == "f" and json.loads(calls[0].arguments) == {"a": 1}


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_required_array_streams_names_then_arguments(step):
    content, joined, calls = run(RequiredCalls(), REQUIRED, list(range(step, len(REQUIRED), step)))
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": 'Pa"ris{', "n": [1, {"x": "]"}]}
    assert calls[1].arguments == "{}"
    assert [v[1:] for v in joined.values()] == [[c.name, c.arguments] for c in calls]


def test_named_call_is_the_whole_output():
    content, joined, calls = run(NamedCall("get_weather"), '{"city": "Rome"}', [3, 9])
    assert content == "" and joined[0][1:] == ["get_weather", '{"city": "Rome"}'] and calls[0].arguments == '{"city": "Rome"}'


def test_llama3_json_parser():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}'
    content, joined, calls = run(Llama3JsonParser(), text, list(range(4, len(text), 4)))
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"] and len(joined) == 2
    content, joined, calls = run(Llama3JsonParser(), "Hello {there}", [2, 6])
    assert content == "Hello {there}" and not calls
    content, _, calls = run(Llama3JsonParser(), '{"broken": ', [3])
    assert content == '{"broken": ' and not calls


WEATHER = ToolSpec("get_weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}}})
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]


def test_fallback_rendering_for_a_template_without_tools(tokenizer):
    tpl = tokenizer.hf.chat_template
    assert not template_knows_tools(tpl)  # SmolLM2's template ignores tools: the fallback renders them
    msgs, tools = render_messages(HISTORY, ToolRequest((WEATHER,), "auto", rendered=(WEATHER,)), tpl, "hermes")
    assert tools is None and msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"] and '"get_weather"' in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"}
    text = tokenizer.decode(tokenizer.apply_chat_template(msgs), skip_special_tokens=False)
    assert "<tool_call>" in text and "You are a helpful AI assistant named SmolLM" not in text
    msgs, _ = render_messages(HISTORY[:1], ToolRequest((WEATHER,), "none"), tpl, "hermes")
    assert msgs == [{"role": "user", "content": "Weather in Paris?"}]  # tool_choice none: no tool list
    msgs, _ = render_messages(HISTORY, ToolRequest((WEATHER,), "auto", rendered=(WEATHER,)), tpl, "llama3_json")
    assert msgs[2]["content"] == '{"name": "get_weather", "parameters": {"city": "Paris"}}'


def test_native_rendering_for_a_template_with_tools(tokenizer):
    tpl = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
           "{% for m in messages %}{{ m.role }}: {{ m.content }}"
           "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}\n{% endfor %}")
    assert template_knows_tools(tpl)
    msgs, tools = render_messages(HISTORY, ToolRequest((WEATHER,), "required", rendered=(WEATHER,)), tpl, None)
    assert tools == [WEATHER.openai()]
    assert msgs[1]["content"] == "" and msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    tokenizer.hf.chat_template, saved = tpl, tokenizer.hf.chat_template
    try:
        text = tokenizer.decode(tokenizer.apply_chat_template(msgs, add_generation_prompt=False, tools=tools))
    finally:
        tokenizer.hf.chat_template = saved
    assert text == "TOOLS:get_weather;user: Weather in Paris?assistant: [get_weather Paris]tool: 18C"  # (trim_blocks)
