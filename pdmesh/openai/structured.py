"""Structured-output request fields -> one validated ``GrammarSpec`` (or None).

OpenAI's ``response_format`` (``json_object``, ``json_schema``), vLLM's ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar`` and its newer ``structured_outputs`` object
all name one grammar; a request may use one of them.  An invalid schema, regex or grammar is a 400
naming the field (checked here, before any worker sees the request).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Optional

from pdmesh.engine.grammar import GrammarError, GrammarKind, GrammarSpec, validate
from pdmesh.openai.errors import bad, not_supported

_STRUCTURED_KEYS: dict[str, GrammarKind] = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "ebnf",
                                              "json_object": "json_object"}


def _schema_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise bad(f"'{param}' is not valid JSON: {exc.msg}", param) from None
    if not isinstance(value, (dict, bool)):
        raise bad(f"'{param}' must be a JSON schema (an object)", param)
    return json.dumps(value, ensure_ascii=False)


def _choices(value: Any, param: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise bad(f"'{param}' must be a non-empty list of non-empty strings", param)
    return json.dumps(value, ensure_ascii=False)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad(f"'{param}' must be a non-empty string", param)
    return value


def _response_format(rf: Any) -> Optional[GrammarSpec]:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad("'response_format' must be an object with a 'type'", "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise bad("'response_format.json_schema' must be an object with a 'schema'", "response_format")
        if js.get("name") is not None and not isinstance(js.get("name"), str):
            raise bad("'response_format.json_schema.name' must be a string", "response_format")
        return GrammarSpec("json_schema", _schema_text(js["schema"], "response_format"))
    raise not_supported("response_format", f"type {kind!r} (use text, json_object or json_schema)")


def _structured_outputs(so: Any) -> Optional[GrammarSpec]:
    if not isinstance(so, dict):
        raise bad("'structured_outputs' must be an object", "structured_outputs")
    given = [k for k, v in so.items() if v is not None and v is not False]
    unknown = [k for k in given if k not in _STRUCTURED_KEYS]
    if unknown:
        raise not_supported("structured_outputs", f"option {unknown[0]!r}")
    if len(given) > 1:
        raise bad(f"'structured_outputs' must name one constraint; got {', '.join(sorted(given))}", "structured_outputs")
    if not given:
        return None
    key = given[0]
    value = so[key]
    kind = _STRUCTURED_KEYS[key]
    if kind == "json_schema":
        return GrammarSpec(kind, _schema_text(value, "structured_outputs"))
    if kind == "choice":
        return GrammarSpec(kind, _choices(value, "structured_outputs"))
    if kind == "json_object":
        if value is not True:
            raise bad("'structured_outputs.json_object' must be true", "structured_outputs")
        return GrammarSpec(kind)
    return GrammarSpec(kind, _text(value, "structured_outputs"))


def structured_output(body: dict[str, Any]) -> tuple[Optional[GrammarSpec], Optional[str]]:
    """The request's grammar and the field that named it (None, None: unconstrained)."""
    found: list[tuple[str, Optional[GrammarSpec]]] = []
    if body.get("response_format") is not None:
        found.append(("response_format", _response_format(body["response_format"])))
    if body.get("guided_json") is not None:
        found.append(("guided_json", GrammarSpec("json_schema", _schema_text(body["guided_json"], "guided_json"))))
    if body.get("guided_regex") is not None:
        found.append(("guided_regex", GrammarSpec("regex", _text(body["guided_regex"], "guided_regex"))))
    if body.get("guided_choice") is not None:
        found.append(("guided_choice", GrammarSpec("choice", _choices(body["guided_choice"], "guided_choice"))))
    if body.get("guided_grammar") is not None:
        found.append(("guided_grammar", GrammarSpec("ebnf", _text(body["guided_grammar"], "guided_grammar"))))
    if body.get("structured_outputs") is not None:
        found.append(("structured_outputs", _structured_outputs(body["structured_outputs"])))
    found = [(k, s) for k, s in found if s is not None]
    if len(found) > 1:
        raise bad(f"only one structured-output field may be given; got {', '.join(k for k, _ in found)}", found[1][0])
    if not found:
        return None, None
    param, spec = found[0]
    assert spec is not None
    check_grammar(spec, param)
    return spec, param


_validate_cached = functools.lru_cache(maxsize=512)(validate)
"""Specs seen valid before are not parsed again (a front end sees the same schemas over and over)."""


def check_grammar(spec: GrammarSpec, param: str) -> None:
    """400 naming ``param`` if ``spec`` cannot be compiled."""
    try:
        _validate_cached(spec)
    except GrammarError as exc:
        raise bad(f"'{param}': {exc}", param, "invalid_grammar") from None
