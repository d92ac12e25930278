"""Requests as the engine sees them: sampling parameters, sequences and their outputs."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

from pdmesh.engine.grammar import GrammarSpec

if TYPE_CHECKING:
    from pdmesh.engine.grammar import GrammarState
    from pdmesh.engine.spec_decode import SpecState

MAX_LOGPROBS = 20
"""Most alternatives per token that logprobs and prompt_logprobs may ask for."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (vLLM's field names and meanings)."""

    n: int = 1
    """Independent samples (expanded into n requests by the front end)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top probability."""
    seed: Optional[int] = None
    """Makes sampling reproducible: token i is drawn from a generator seeded by (seed, i)."""
    presence_penalty: float = 0.0
    """Subtracted from logits of tokens already generated."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence of a generated token."""
    repetition_penalty: float = 1.0
    """Divides positive / multiplies negative logits of prompt and generated tokens."""
    max_tokens: int = 16
    """Most tokens to generate."""
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens exist."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end the request."""
    stop: tuple[str, ...] = ()
    """Strings that end the request (checked on detokenized text by the front end)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string in the text."""
    ignore_eos: bool = False
    """Do not stop at EOS (benchmarks)."""
    logprobs: Optional[int] = None
    """Return the sampled token's logprob and this many top alternatives (None: none)."""
    skip_special_tokens: bool = True
    """Drop special tokens from detokenized text."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling; bias in [-100, 100]."""
    grammar: Optional[GrammarSpec] = None
    """Structured output: the tokens must spell a string of this grammar (and it decides the end)."""
    prompt_logprobs: Optional[int] = None
    """Return each prompt token's logprob (after the first) with this many alternatives (None:
    none); such a request's prompt is computed in full (no prefix-cache hits)."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 (disabled) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]")
        for tok, bias in self.logit_bias:
            if tok < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias: token ids must be >= 0 and biases in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0

    def with_updates(self, **kw) -> "SamplingParams":
        return replace(self, **kw)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """Queued for (re)computation."""
    RUNNING = "running"
    """In the batch."""
    WAITING_FOR_KV = "waiting_for_kv"
    """Decode side: blocks allocated, KV being pulled from a prefill worker."""
    HELD = "held"
    """Prefill side: first token sampled, KV kept for a decode worker to pull."""
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Logprob of one token and its top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int = 0
    """1 + the number of tokens more likely than this one (prompt logprobs; 0: not computed)."""


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    prefill_only: bool = False
    """Prefill role: stop after the first token and keep the KV (unless the request ended)."""
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at first admission."""
    status: SequenceStatus = SequenceStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: Optional[float] = None
    finish_reason: Optional[str] = None
    num_preemptions: int = 0
    grammar: Optional["GrammarState"] = None
    """Structured output: the grammar's state after this sequence's output tokens (engine-owned)."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """Logprobs of prompt tokens 1.. computed so far (``params.prompt_logprobs`` requests)."""
    spec_token_ids: list[int] = field(default_factory=list)
    """Speculative decoding: draft tokens to verify after the last token this step (engine-owned;
    the scheduler gives the sequence 1 + len(drafts) new tokens; cleared when the step is done)."""
    spec_state: Optional["SpecState"] = None
    """Speculative decoding: the proposer's per-sequence state (token history, back-off)."""
    tiers_looked_up: bool = False
    """Its prefix was looked up in the lower KV tiers (counted once in their hit/miss counters)."""

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and are not all computed yet."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: Optional[str] = None
    """'stop', 'length', 'abort'; None while running (or when a prefill hands over to decode)."""
    logprobs: Optional[list[TokenLogprob]] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    held_block_ids: Optional[list[int]] = None
    """Prefill role: blocks kept for transfer (in token order)."""
    held_block_checksums: Optional[list[int]] = None
    """Prefill role with ``--kv-audit``: per-block checksums of the held prompt KV."""
    queue_time: float = 0.0
    """Seconds between arrival and first scheduling."""
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    """On a request's first output when asked: logprobs of prompt tokens 1.. (token 0 has none)."""
    prefill_time: Optional[float] = None
    """On the output carrying a request's first generated token (prefill and colocated roles):
    seconds from its first scheduling to that token (vLLM's request_prefill_time); else None."""
