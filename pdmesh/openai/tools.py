"""Tool calling: the request side.

* ``parse_tools`` validates ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` into a
  ``ToolRequest``: which functions exist and how the output is read — ``auto`` (the model may call
  tools in its own format; a ``--tool-call-parser`` reads them), ``required`` (a JSON array of
  ``{"name", "parameters"}``) or ``named`` (the output is that function's arguments).  ``required``
  and ``named`` carry a grammar (a JSON schema), so the arguments always parse and obey each
  function's schema.
* ``render_messages`` prepares messages and tools for the chat template.  A template that knows
  tools (its source mentions ``tools``) gets them as Hugging Face's ``apply_chat_template(tools=)``
  expects, with assistant ``tool_calls`` whose arguments are objects.  A template that does not
  (SmolLM2's, for one) gets the fallback: a system prompt that lists the functions and asks for
  calls in the parser's format (hermes: ``<tool_call>{"name", "arguments"}</tool_call>``;
  llama3_json: ``{"name", "parameters"}``), assistant calls written in that format, and tool
  results as user turns wrapped in ``<tool_response>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pdmesh.engine.grammar import GrammarSpec
from pdmesh.openai.errors import bad, not_supported
from pdmesh.openai.structured import check_grammar

ToolParserName = Literal["hermes", "llama3_json"]
ToolMode = Literal["none", "auto", "required", "named"]
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: Optional[dict[str, Any]]

    def openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.parameters is not None:
            fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[ToolSpec, ...] = ()
    mode: ToolMode = "none"
    named: str = ""
    """The function that must be called (mode 'named')."""
    parallel: bool = True
    grammar: Optional[GrammarSpec] = None
    """required/named: the JSON schema the output must obey."""
    rendered: tuple[ToolSpec, ...] = field(default=())
    """The tools the prompt lists (none when tool_choice is 'none')."""


def _tool(t: Any, i: int) -> ToolSpec:
    fn = t.get("function") if isinstance(t, dict) else None
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
        if isinstance(t, dict) and t.get("type") not in (None, "function"):
            raise not_supported("tools", f"tools[{i}] has type {t.get('type')!r} (function only)")
        raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'description', 'parameters'}}}}", "tools")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'", "tools")
    desc = fn.get("description", "")
    if not isinstance(desc, str):
        raise bad(f"tools[{i}].function.description must be a string", "tools")
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        check_grammar(GrammarSpec("json_schema", json.dumps(params)), "tools")
    return ToolSpec(name, desc, params)


def _hoist_defs(schemas: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Move each schema's ``$defs`` to one top level (references stay '#/$defs/...')."""
    defs: dict[str, Any] = {}
    out = []
    for s in schemas:
        s = dict(s)
        for k, v in (s.pop("$defs", None) or {}).items():
            if k in defs and defs[k] != v:
                raise bad(f"tools: two functions define '$defs/{k}' differently", "tools")
            defs[k] = v
        out.append(s)
    return out, defs


def _params_schema(t: ToolSpec) -> dict[str, Any]:
    return t.parameters if t.parameters is not None else {"type": "object", "properties": {}}


def required_grammar(tools: tuple[ToolSpec, ...], parallel: bool) -> GrammarSpec:
    """A JSON array of one or more (one, unless parallel) ``{"name": N, "parameters": ...}`` calls."""
    params, defs = _hoist_defs([_params_schema(t) for t in tools])
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.name]}, "parameters": p},
              "required": ["name", "parameters"], "additionalProperties": False} for t, p in zip(tools, params)]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return GrammarSpec("json_schema", json.dumps(schema))


def parse_tools(body: dict[str, Any], parser: Optional[ToolParserName], auto_enabled: bool) -> ToolRequest:
    raw = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if raw is None or raw == []:
        if choice not in (None, "none"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return ToolRequest()
    if not isinstance(raw, list):
        raise bad("'tools' must be a list", "tools")
    tools = tuple(_tool(t, i) for i, t in enumerate(raw))
    if len({t.name for t in tools}) != len(tools):
        raise bad("'tools' has two functions with the same name", "tools")
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolRequest(tools, "none", parallel=parallel)
    if choice == "auto":
        if not auto_enabled or parser is None:
            raise bad('"auto" tool choice needs the gateway started with --enable-auto-tool-choice and '
                      "--tool-call-parser", "tool_choice")
        return ToolRequest(tools, "auto", parallel=parallel, rendered=tools)
    if choice == "required":
        return ToolRequest(tools, "required", parallel=parallel, grammar=required_grammar(tools, parallel), rendered=tools)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                  "tool_choice")
    match = [t for t in tools if t.name == fn["name"]]
    if not match:
        raise bad(f"'tool_choice' names {fn['name']!r}, which is not in 'tools'", "tool_choice")
    grammar = GrammarSpec("json_schema", json.dumps(_params_schema(match[0])))
    return ToolRequest(tools, "named", named=match[0].name, parallel=parallel, grammar=grammar, rendered=tools)


# ---------------------------------------------------------------------- rendering

def template_knows_tools(template: Any) -> bool:
    """Whether a chat template renders ``tools`` itself (its source mentions them)."""
    if isinstance(template, dict):
        return any("tools" in str(t) for t in template.values())
    return isinstance(template, str) and "tools" in template


_HERMES = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
           "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
           "For each function call, return a json object with function name and arguments within "
           "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
           "<args-json-object>}}\n</tool_call>")
_LLAMA3 = ("You have access to the following functions:\n\n{tools}\n\nTo call a function, respond with only a JSON "
           "object of the form {{\"name\": <function-name>, \"parameters\": <args-json-object>}} and nothing else.")


def _args_object(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return text


def _call_text(call: dict[str, Any], parser: Optional[ToolParserName]) -> str:
    fn = call["function"]
    if parser == "llama3_json":
        return json.dumps({"name": fn["name"], "parameters": _args_object(fn["arguments"])}, ensure_ascii=False)
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": _args_object(fn["arguments"])},
                                        ensure_ascii=False) + "\n</tool_call>"


def render_messages(messages: list[dict[str, Any]], req: ToolRequest, template: Any,
                    parser: Optional[ToolParserName]) -> tuple[list[dict[str, Any]], Optional[list[dict[str, Any]]]]:
    """(messages, tools) for ``apply_chat_template``: native when the template knows tools, else
    the fallback described in the module docstring (tools then None)."""
    if template_knows_tools(template):
        out = []
        for m in messages:
            m = dict(m, content=m["content"] if m["content"] is not None else "")
            if "tool_calls" in m:
                m["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["function"]["name"], "arguments": _args_object(c["function"]["arguments"])}}
                    for c in m["tool_calls"]]
            out.append(m)
        return out, [t.openai() for t in req.rendered] or None
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content'] or ''}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = [_call_text(c, parser) for c in m["tool_calls"]]
            text = ("; " if parser == "llama3_json" else "\n").join(calls)
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + text})
        else:
            out.append({"role": m["role"], "content": m["content"] or ""})
    if req.rendered:
        listing = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in req.rendered)
        prompt = (_LLAMA3 if parser == "llama3_json" else _HERMES).format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None
