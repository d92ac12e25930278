"""Chat messages: validation into one normalized shape.

Each message becomes ``{"role", "content": str | None}`` plus, where given, ``tool_calls``
(assistant: ``[{"id", "type": "function", "function": {"name", "arguments": JSON text}}]``),
``tool_call_id`` (tool) and ``name``.  ``developer`` is ``system``.  Content is a string or a list
of text parts; image, audio and file parts are refused (400), never dropped.
"""

from __future__ import annotations

from typing import Any

from pdmesh.openai.errors import bad, not_supported
from pdmesh.openai.values import check_text

ROLES = ("system", "developer", "user", "assistant", "tool")


def _content(m: dict[str, Any], i: int) -> str | None:
    content = m.get("content")
    if content is None:
        return None
    if isinstance(content, str):
        return check_text(content, "messages")
    if not isinstance(content, list):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(f"messages[{i}].content[{j}] must be an object with a 'type'", "messages")
        if part["type"] != "text":
            raise not_supported("messages", f"messages[{i}].content[{j}] is a {part['type']!r} part (text only)")
        if not isinstance(part.get("text"), str):
            raise bad(f"messages[{i}].content[{j}].text must be a string", "messages")
        parts.append(check_text(part["text"], "messages"))
    return "".join(parts)


def _tool_calls(m: dict[str, Any], i: int) -> list[dict[str, Any]]:
    calls = m.get("tool_calls")
    if not isinstance(calls, list):
        raise bad(f"messages[{i}].tool_calls must be a list", "messages")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", ""), str):
            raise bad(f"messages[{i}].tool_calls[{j}] must be {{'id', 'type': 'function', 'function': "
                      "{'name', 'arguments': JSON text}}", "messages")
        if c.get("type", "function") != "function":
            raise not_supported("messages", f"messages[{i}].tool_calls[{j}] has type {c.get('type')!r} (function only)")
        cid = c.get("id", "")
        if not isinstance(cid, str):
            raise bad(f"messages[{i}].tool_calls[{j}].id must be a string", "messages")
        out.append({"id": cid, "type": "function",
                    "function": {"name": check_text(fn["name"], "messages"),
                                 "arguments": check_text(fn.get("arguments", ""), "messages")}})
    return out


def normalize_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _content(m, i)}
        if m.get("tool_calls"):
            if role != "assistant":
                raise bad(f"messages[{i}]: only assistant messages carry tool_calls", "messages")
            msg["tool_calls"] = _tool_calls(m, i)
        if role == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or not tid:
                raise bad(f"messages[{i}]: a tool message needs 'tool_call_id'", "messages")
            msg["tool_call_id"] = tid
        if isinstance(m.get("name"), str):
            msg["name"] = check_text(m["name"], "messages")
        if msg["content"] is None and not msg.get("tool_calls") and role != "assistant":
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append(msg)
    return out
