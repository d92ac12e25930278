"""Splits streamed model text into reasoning (inside ``<think>...</think>``) and content.

Only a ``<think>`` at the very start of the output (after whitespace) opens reasoning; when the
chat template already opened it (the prompt ends with ``<think>``), start with
``in_reasoning=True``.  Newlines right after ``</think>`` are dropped from the content.
"""

from __future__ import annotations


class ReasoningParser:
    def __init__(self, start: str = "<think>", end: str = "</think>", in_reasoning: bool = False) -> None:
        self.start, self.end = start, end
        self.mode = "reasoning" if in_reasoning else "start"
        self.pending = ""

    @property
    def in_reasoning(self) -> bool:
        return self.mode == "reasoning"

    def feed(self, delta: str) -> tuple[str, str]:
        """Text delta -> (reasoning delta, content delta)."""
        buf = self.pending + delta
        self.pending = ""
        reasoning = ""
        if self.mode == "start":
            s = buf.lstrip()
            if s.startswith(self.start):
                self.mode, buf = "reasoning", s[len(self.start):]
            elif self.start.startswith(s):
                self.pending = buf
                return "", ""
            else:
                self.mode = "content"
        if self.mode == "reasoning":
            idx = buf.find(self.end)
            if idx < 0:
                hold = next((k for k in range(min(len(self.end) - 1, len(buf)), 0, -1) if buf.endswith(self.end[:k])), 0)
                self.pending = buf[len(buf) - hold:] if hold else ""
                return buf[: len(buf) - hold], ""
            reasoning, buf = buf[:idx], buf[idx + len(self.end):]
            self.mode = "after_end"
        if self.mode == "after_end":
            buf = buf.lstrip("\n")
            if buf:
                self.mode = "content"
        return reasoning, buf

    def flush(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        return (rest, "") if self.mode == "reasoning" else ("", rest)
