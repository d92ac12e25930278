"""One choice's token stream -> OpenAI text: incremental detokenization, stop strings, the
``<think>`` split, tool-call extraction; and what a finished choice shows the client.

``TextPipeline.add(token_ids)`` turns each batch of tokens into a ``Delta`` (reasoning, content and
tool-call pieces); ``finish()`` flushes what was held back (a partial stop string, a partial tag).
``ChoiceOutput`` accumulates the deltas: it is what full responses and usage are built from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pdmesh.engine.sequence import SamplingParams, TokenLogprob
from pdmesh.openai.errors import APIError
from pdmesh.openai.reasoning import ReasoningParser
from pdmesh.openai.tool_parsers import ToolCall, ToolCallDelta, ToolCallExtractor
from pdmesh.tokenizer import StopStringMatcher, Tokenizer


@dataclass
class Delta:
    """What one batch of a choice's tokens adds to its answer."""

    index: int
    reasoning: str = ""
    content: str = ""
    logprobs: Optional[list[TokenLogprob]] = None
    token_ids: Optional[list[int]] = None
    finish_reason: Optional[str] = None
    error: Optional[APIError] = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    first: bool = False
    """The choice's first delta (echo and prompt logprobs go with it)."""

    @property
    def empty(self) -> bool:
        return not (self.content or self.reasoning or self.finish_reason or self.tool_calls or self.logprobs)


@dataclass
class ChoiceOutput:
    """The client-visible result of one choice, as it accumulates."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""
    reasoning_tokens: int = 0
    finish_reason: Optional[str] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    """Logprobs of prompt tokens 1.. (when asked)."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    echo: str = ""
    """Text that leads the answer (completions' echo: the prompt; chat's: the final assistant message)."""
    num_cached_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.reasoning += d.reasoning
        self.text += d.content
        if d.logprobs:
            self.logprobs.extend(d.logprobs)


class TextPipeline:
    """detokenize -> stop strings -> reasoning split -> tool calls, for one choice."""

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                 reasoning: Optional[ReasoningParser], tools: Optional[ToolCallExtractor]) -> None:
        self.detok = tok.detokenizer(prompt_ids, params.skip_special_tokens)
        self.stop = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.reasoning = reasoning
        self.tools = tools

    def _split(self, text: str, delta: Delta) -> None:
        r, c = self.reasoning.feed(text) if self.reasoning else ("", text)
        delta.reasoning += r
        self._content(c, delta)

    def _content(self, c: str, delta: Delta) -> None:
        if self.tools is not None and c:
            c, calls = self.tools.feed(c)
            delta.tool_calls.extend(calls)
        delta.content += c

    def add(self, token_ids: list[int], delta: Delta) -> Optional[int]:
        """Text of ``token_ids`` into ``delta``, token by token; when a stop string is hit, how many
        of them were needed to complete it (the rest are not part of the choice: a step that
        produced several tokens, e.g. accepted speculative drafts, may run past the stop), else None."""
        emit, cut = self.stop.feed_tokens(self.detok, token_ids)
        self._split(emit, delta)
        return cut

    def finish(self, delta: Delta, stopped: bool) -> None:
        """Everything held back, into ``delta`` (at the choice's end)."""
        if not stopped:
            emit, hit = self.stop.feed(self.detok.flush())
            self._split(emit if hit else emit + self.stop.flush(), delta)
        if self.reasoning:
            r, c = self.reasoning.flush()
            delta.reasoning += r
            self._content(c, delta)
        if self.tools is not None:
            c, calls = self.tools.finish()
            delta.content += c
            delta.tool_calls.extend(calls)
