"""Speculative decoding with n-gram proposals: engine state with one owner (``LLMEngine.spec``).

One verify step per sequence that has a proposal (K draft tokens ``d_1..d_K``):

1. ``propose`` (before scheduling, engine thread): a running sequence with exactly one pending
   token (its last sampled one, ``t``) gets drafts from ``pdmesh.engine.ngram`` in
   ``Sequence.spec_token_ids``.  The scheduler gives it ``1 + K`` new tokens (fewer drafts when the
   budget or free blocks are short: drafts are dropped before anyone is preempted).
2. The runner runs ``t, d_1..d_K`` at positions ``p..p+K`` in one forward pass over the paged KV
   (their K/V are written to slots ``p..p+K``) and samples a *target* token from each of the K + 1
   rows: row ``j`` is sampled as the sequence's output token ``num_output_tokens + j`` would be
   without speculation (same temperature/top-k/top-p/min-p, logit bias, min_tokens suppression,
   and for seeded requests the noise of generator ``(seed, output index)``).
3. ``accept``: the longest prefix of drafts equal to the targets is accepted (``a`` tokens) and the
   sequence gets ``targets[0..a]``: the accepted drafts plus one more token (the correction at the
   first mismatch, or the bonus token after K accepted drafts).

Exactness: a target is a sample of its row's distribution ``p_j`` (the exponential race of
``pdmesh.engine.sampler``: ``argmax(p / q)``, ``q ~ Exp(1)``); accepting the draft iff the sample
equals it is rejection sampling for a draft distribution concentrated on ``d_j`` (accept with
probability ``p_j(d_j)``; on rejection the token is distributed as ``p_j`` without ``d_j``,
renormalised, which is ``norm(max(0, p_j - q_j))``).  Every emitted token is therefore drawn from
the model's distribution given the tokens before it: greedy output is the non-speculative output,
and a seeded request gives exactly the tokens it gives without speculation.

KV of rejected drafts: slots ``p+a+1..p+K`` hold K/V of tokens the sequence does not have.  They lie
past ``num_computed_tokens`` (never hashed into the prefix cache, overwritten by the next step) and
blocks holding nothing but them are returned at once (``PrefixCachingBlockManager.trim``): after a
verify step a sequence holds exactly the blocks of its computed tokens, as without speculation.

Sequences that never speculate: prompt steps, prefill-only (prefill role), penalties (they depend
on every earlier output token), grammars (a mask per step).  A sequence that may speculate goes one
step at a time under async scheduling (a proposal needs its last token on the host), so where
proposals keep failing it backs off: after ``MISSES_BEFORE_BACKOFF`` steps in a row without an
accepted draft (no match, or every draft rejected) it proposes nothing for the next
``BACKOFF_TOKENS`` output tokens, doubling each time up to ``MAX_BACKOFF_TOKENS`` and reset by an
accepted draft; meanwhile it decodes like any other sequence, steps launched behind included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pdmesh.config import SpeculativeConfig
from pdmesh.engine.ngram import TokenHistory, propose_ngram
from pdmesh.engine.sequence import Sequence


MISSES_BEFORE_BACKOFF = 4
BACKOFF_TOKENS = 16
MAX_BACKOFF_TOKENS = 256


@dataclass
class SpecState:
    """One sequence's proposer state (on its ``Sequence``; engine thread only)."""

    history: TokenHistory = field(default_factory=TokenHistory)
    """The sequence's tokens as a numpy buffer (appended to, never rebuilt)."""
    misses: int = 0
    """Verify opportunities in a row without an accepted draft."""
    backoff: int = 0
    """Output tokens of the current back-off (0: none yet)."""
    cold_until: int = 0
    """No proposals while the sequence has fewer output tokens than this."""

    def missed(self, num_output_tokens: int) -> None:
        self.misses += 1
        if self.misses >= MISSES_BEFORE_BACKOFF:
            self.backoff = min(MAX_BACKOFF_TOKENS, 2 * self.backoff if self.backoff else BACKOFF_TOKENS)
            self.cold_until = num_output_tokens + self.backoff
            self.misses = 0

    def hit(self) -> None:
        self.misses = self.backoff = 0


def speculable(seq: Sequence) -> bool:
    """Whether this sequence may get draft tokens (its sampling depends only on its position)."""
    return not seq.prefill_only and seq.grammar is None and not seq.params.has_penalties


def may_propose(seq: Sequence) -> bool:
    """Whether the next step may propose drafts for ``seq`` (speculable and not backing off)."""
    st: Optional[SpecState] = seq.spec_state
    return speculable(seq) and (st is None or seq.num_output_tokens >= st.cold_until)


@dataclass
class SpecStats:
    """Counters, as vLLM's spec_decode metrics (cumulative since the engine started)."""

    num_drafts: int = 0
    """Verify steps of one sequence that carried at least one draft token."""
    num_draft_tokens: int = 0
    """Draft tokens verified."""
    num_accepted_tokens: int = 0
    """Draft tokens accepted."""
    accepted_per_pos: list[int] = field(default_factory=list)
    """[K]: drafts accepted at position i (0-based) of their proposal."""

    def copy(self) -> "SpecStats":
        return SpecStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, list(self.accepted_per_pos))

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify step with drafts (1 + accepted drafts), vLLM's definition."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpecDecoder:
    """Proposes drafts for running sequences and decides which are accepted (engine thread only)."""

    def __init__(self, cfg: SpeculativeConfig, max_model_len: int) -> None:
        self.cfg = cfg
        self.max_model_len = max_model_len
        self.stats = SpecStats(accepted_per_pos=[0] * cfg.num_speculative_tokens)

    def reset(self) -> None:
        """Zero the counters (after a warm-up)."""
        self.stats = SpecStats(accepted_per_pos=[0] * self.cfg.num_speculative_tokens)

    def propose(self, running: list[Sequence]) -> None:
        """Fill ``spec_token_ids`` of every running sequence about to decode one token: at most K,
        never more than its max_tokens or max_model_len leave room for (the verify step emits up to
        drafts + 1 tokens)."""
        cfg = self.cfg
        for seq in running:
            seq.spec_token_ids = []
            if seq.num_tokens - seq.num_computed_tokens != 1 or not may_propose(seq):
                continue
            room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
            k = min(cfg.num_speculative_tokens, room)
            if k < 1:
                continue
            if seq.spec_state is None:
                seq.spec_state = SpecState()
            tokens = seq.spec_state.history.sync(seq.token_ids)
            seq.spec_token_ids = propose_ngram(tokens, k, cfg.prompt_lookup_min, cfg.prompt_lookup_max)
            if not seq.spec_token_ids:
                seq.spec_state.missed(seq.num_output_tokens)

    def accept(self, seq: Sequence, targets: list[int]) -> int:
        """``targets`` [1 + K]: the tokens sampled at the verify step's rows of ``seq`` (its drafts
        being ``seq.spec_token_ids``).  Returns how many of ``targets`` the sequence gets
        (accepted drafts + 1), counts them, and clears the drafts."""
        drafts = seq.spec_token_ids
        a = 0
        while a < len(drafts) and targets[a] == drafts[a]:
            a += 1
        if drafts:
            s = self.stats
            s.num_drafts += 1
            s.num_draft_tokens += len(drafts)
            s.num_accepted_tokens += a
            for i in range(a):
                s.accepted_per_pos[i] += 1
            if seq.spec_state is not None and a:
                seq.spec_state.hit()
            elif seq.spec_state is not None:
                seq.spec_state.missed(seq.num_output_tokens + 1)  # (+1: the token this step emits)
        seq.spec_token_ids = []
        return a + 1

