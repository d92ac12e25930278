"""N-gram (prompt lookup) proposals: the next tokens of a sequence guessed from its own history.

The sequence's last ``n`` tokens (its suffix, ``prompt_lookup_max >= n >= prompt_lookup_min``)
are looked up earlier in its prompt + output; where they occurred before, the tokens that followed
that occurrence are the proposal (up to K).  The longest n that matches wins; among matches of that
length, the most recent one (the text being copied is usually the latest occurrence).

Cost: one vectorised pass over the history per sequence and step (candidates are the positions
holding the last token, then filtered one suffix token at a time), never a Python loop over tokens.
Each sequence keeps its history as a growing numpy buffer (``TokenHistory``), appended to as the
sequence grows, so a long prompt is converted once.
"""

from __future__ import annotations

import numpy as np


class TokenHistory:
    """A sequence's token ids as an int64 numpy buffer, synced by appending (token lists only grow)."""

    __slots__ = ("buf", "n")

    def __init__(self) -> None:
        self.buf = np.empty(256, dtype=np.int64)
        self.n = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """The first ``len(token_ids)`` ids as an array view (appends what is new since the last call)."""
        total = len(token_ids)
        if total > self.buf.shape[0]:
            grown = np.empty(max(total, 2 * self.buf.shape[0]), dtype=np.int64)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        if total > self.n:
            self.buf[self.n:total] = token_ids[self.n:total]
            self.n = total
        return self.buf[:total]


def propose_ngram(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` tokens following the latest earlier occurrence of the longest suffix of
    ``tokens`` [L] of length in ``[min_n, max_n]``; [] when no such suffix occurred before."""
    length = tokens.shape[0]
    if k < 1 or length < min_n + 1:
        return []
    # candidates: positions c < L-1 where a match of the suffix could end (tokens[c] == last token)
    ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])
    best_len = 1
    matched = ends
    for m in range(1, min(max_n, length - 1)):
        keep = matched[matched >= m]
        keep = keep[tokens[keep - m] == tokens[length - 1 - m]]
        if keep.size == 0:
            break
        matched, best_len = keep, m + 1
    if best_len < min_n or matched.size == 0:
        return []
    start = int(matched[-1]) + 1  # the latest occurrence; it is followed by at least one token
    return tokens[start:start + k].tolist()
