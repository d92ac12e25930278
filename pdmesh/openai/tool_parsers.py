"""Tool calling: the response side.  Model text in, content and tool-call deltas out, streamed.

``feed(text)`` returns ``(content, deltas)`` for each piece of text; ``finish()`` the rest.  The
deltas follow OpenAI's streaming shape: a call's first delta carries its ``id`` and ``name``, the
following ones pieces of its ``arguments`` (JSON text) to concatenate.  ``calls`` is the list of
complete calls once finished.

* ``NamedCall`` (tool_choice names a function): the whole output is its arguments, streamed as
  they are generated.
* ``RequiredCalls`` (tool_choice 'required'): the output is a JSON array of ``{"name",
  "parameters"}`` (the grammar guarantees it); names and arguments stream as they are generated.
  A call cut short by max_tokens is left out of ``calls`` (finish_reason is then 'length').
* ``HermesParser`` (auto, ``--tool-call-parser hermes``): text outside
  ``<tool_call>...</tool_call>`` is content; each block holds ``{"name", "arguments"}`` and becomes
  one call when it closes.  A block that is not such JSON stays content.
* ``Llama3JsonParser`` (auto, ``llama3_json``): output that starts with ``{`` (or
  ``<|python_tag|>``) is read at the end as ``{"name", "parameters"}`` objects separated by ``;``;
  if it is not, all of it is content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from pdmesh.openai.tools import ToolParserName, ToolRequest


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCallDelta:
    index: int
    """Which call of the choice."""
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


class ToolCallExtractor(Protocol):
    calls: list[ToolCall]

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]: ...

    def finish(self) -> tuple[str, list[ToolCallDelta]]: ...


class NamedCall:
    def __init__(self, name: str) -> None:
        self.calls = [ToolCall(call_id(), name, "")]
        self._started = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        call = self.calls[0]
        call.arguments += text
        if not self._started:
            self._started = True
            return "", [ToolCallDelta(0, call.id, call.name, text)]
        return "", [ToolCallDelta(0, arguments=text)] if text else []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self.feed("") if not self._started else ("", [])


class RequiredCalls:
    """Scans ``[{"name": "f", "parameters": {...}}, ...]`` as it streams (strings, escapes and
    nesting tracked), emitting each call's name once it is complete and its parameters' raw text."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._key = ""          # last key read at depth 2
        self._str = ""          # current string's raw characters
        self._expect_key = False
        self._args_depth = -1   # depth at which the current parameters value started (-1: not in one)
        self._pending: dict[int, str] = {}  # parameters text seen before the call's name
        self._closed: set[int] = set()  # calls whose parameters are complete

    def _emit_args(self, text: str, out: list[ToolCallDelta]) -> None:
        i = len(self.calls) - 1
        if self.calls and self.calls[-1].name:
            self.calls[-1].arguments += text
            out.append(ToolCallDelta(i, arguments=text))
        else:
            self._pending[len(self.calls)] = self._pending.get(len(self.calls), "") + text

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        out: list[ToolCallDelta] = []
        run = ""
        for ch in text:
            if self._args_depth >= 0:
                run += ch
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
                    self._string_done(out)
                    continue
                self._str += ch
                continue
            if ch == '"':
                self._in_str, self._str = True, ""
            elif ch in "[{":
                self._depth += 1
                if ch == "{" and self._depth == 2:
                    self.calls.append(ToolCall(call_id(), "", ""))
                    self._expect_key = True
                elif self._depth == 3 and self._key == "parameters" and self._args_depth < 0:
                    self._args_depth, run = 3, ch
            elif ch in "]}":
                self._depth -= 1
                if self._args_depth >= 0 and self._depth < self._args_depth:
                    self._args_depth = -1
                    self._emit_args(run, out)
                    self._closed.add(len(self.calls) - 1)
                    run = ""
            elif ch == "," and self._depth == 2:
                self._expect_key = True
        if run and self._args_depth >= 0:
            self._emit_args(run, out)
        return "", out

    def _string_done(self, out: list[ToolCallDelta]) -> None:
        if self._depth != 2:
            return
        if self._expect_key:
            self._key, self._expect_key = self._str, False
            return
        if self._key == "name" and self.calls and not self.calls[-1].name:
            call = self.calls[-1]
            call.name = json.loads('"' + self._str + '"')
            pending = self._pending.pop(len(self.calls) - 1, "")
            call.arguments = pending
            out.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name, pending))

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Keep the complete calls (a request cut short by max_tokens may end inside one)."""
        self.calls = [c for i, c in enumerate(self.calls) if c.name and i in self._closed]
        return "", []


def _args_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class HermesParser:
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._inside = False
        self._after_call = False  # newlines right after a call are not content

    def _call(self, block: str) -> Optional[ToolCall]:
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        return ToolCall(call_id(), obj["name"], _args_text(args))

    def _take(self, block: str, out: list[ToolCallDelta]) -> Optional[str]:
        """A closed block: a call (None), or, if it is not one, its text as content."""
        call = self._call(block.strip())
        if call is None:
            return self.START + block + self.END
        self.calls.append(call)
        out.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name, call.arguments))
        return None

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content, out = "", list[ToolCallDelta]()
        while True:
            if self._inside:
                end = self._buf.find(self.END)
                if end < 0:
                    return content, out
                kept = self._take(self._buf[:end], out)
                self._buf = self._buf[end + len(self.END):]
                self._after_call = kept is None
                content += kept or ""
                self._inside = False
                continue
            if self._after_call:
                self._buf = self._buf.lstrip("\n")
                if not self._buf:
                    return content, out
                self._after_call = False
            start = self._buf.find(self.START)
            if start >= 0:
                content += self._buf[:start]
                self._buf = self._buf[start + len(self.START):]
                self._inside = True
                continue
            hold = next((k for k in range(min(len(self.START) - 1, len(self._buf)), 0, -1)
                         if self._buf.endswith(self.START[:k])), 0)
            content += self._buf[:len(self._buf) - hold]
            self._buf = self._buf[len(self._buf) - hold:]
            return content, out

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        out: list[ToolCallDelta] = []
        rest, self._buf = self._buf, ""
        if self._inside:  # EOS before the closing tag
            call = self._call(rest.strip())
            if call is not None:
                self.calls.append(call)
                out.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name, call.arguments))
                return "", out
            return self.START + rest, out
        return rest, out


class Llama3JsonParser:
    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._mode = "start"  # start -> json (buffering) | content

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._mode == "content":
            return text, []
        self._buf += text
        head = self._buf.lstrip()
        if self._mode == "start" and head:
            if head.startswith("{") or head.startswith(self.TAG):
                self._mode = "json"
            elif not self.TAG.startswith(head):
                self._mode, rest, self._buf = "content", self._buf, ""
                return rest, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        text, self._buf = self._buf, ""
        if self._mode != "json":
            return text, []
        body = text.strip().removeprefix(self.TAG)
        calls: list[ToolCall] = []
        pos, dec = 0, json.JSONDecoder()
        while pos < len(body):
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
            if pos == len(body):
                break
            try:
                obj, pos = dec.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            calls.append(ToolCall(call_id(), obj["name"], _args_text(obj.get("parameters", obj.get("arguments", {})))))
        if not calls:
            return text, []
        self.calls = calls
        return "", [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]


def make_extractor(req: ToolRequest, parser: Optional[ToolParserName]) -> Optional[ToolCallExtractor]:
    """The extractor a request's output goes through (None: plain content)."""
    if req.mode == "named":
        return NamedCall(req.named)
    if req.mode == "required":
        return RequiredCalls()
    if req.mode == "auto":
        return Llama3JsonParser() if parser == "llama3_json" else HermesParser()
    return None
