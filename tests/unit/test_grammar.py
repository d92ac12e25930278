"""Grammars against the embedded model's tokenizer (no model weights): JSON strings never hold raw
control characters, choices are escaped, compiled grammars are cached per spec, and a matcher
refuses a replayed token outside the grammar."""

from __future__ import annotations

import json

import pytest

from pdmesh.engine.grammar import GrammarEngine, GrammarError, GrammarSpec, validate


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return GrammarEngine(tokenizer.hf, 49152, [2], threads=1)


def accepts(grammars, spec: GrammarSpec, text: str) -> bool:
    st = grammars.new_state(spec)
    return bool(st.matcher.accept_string(text)) and st.accept(2) and st.terminated


def test_json_strings_never_hold_raw_control_characters(grammars):
    spec = GrammarSpec("json_schema", json.dumps({"type": "object", "additionalProperties": False, "required": ["a", "b"],
                                                  "properties": {"a": {"type": "string", "maxLength": 5},
                                                                 "b": {"type": "string"}}}))
    assert accepts(grammars, spec, '{"a": "x y", "b": "z"}')
    for bad in ('{"a": "x\ty", "b": "z"}', '{"a": "x", "b": "\x01"}'):  # what json.loads refuses
        with pytest.raises(json.JSONDecodeError):
            json.loads(bad)
        assert not accepts(grammars, spec, bad), repr(bad)
    assert not accepts(grammars, spec, '{"a": "toolong", "b": ""}')


def test_choices_are_escaped(grammars):
    choices = ['say "hi"', "back\\slash", "café", "a\nb"]
    spec = GrammarSpec("choice", json.dumps(choices))
    for c in choices:
        assert accepts(grammars, spec, c)
    assert not accepts(grammars, spec, "say hi")


def test_cache_replay_and_errors(grammars, tokenizer):
    spec = GrammarSpec("regex", "[0-9]{3}")
    before = grammars.num_compiled
    grammars.compile(spec)
    grammars.compile(GrammarSpec("regex", "[0-9]{3}"))
    assert grammars.num_compiled == before + 1
    digit = tokenizer.encode("7", add_special_tokens=False)
    assert grammars.new_state(spec, digit).accept(tokenizer.encode("1", add_special_tokens=False)[0])
    with pytest.raises(GrammarError, match="does not match the grammar"):
        grammars.new_state(spec, tokenizer.encode("x", add_special_tokens=False))
    with pytest.raises(GrammarError, match="unknown grammar kind"):
        GrammarSpec("lark", "start: x")  # type: ignore[arg-type]
    with pytest.raises(GrammarError, match="invalid json schema"):
        validate(GrammarSpec("json_schema", '{"type": "objekt"}'))
