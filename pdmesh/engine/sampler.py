"""Batched sampling on the model's device.

Order (as vLLM): the grammar's mask (in the runner, before this) -> raw logprobs (if asked) ->
logit_bias -> min_tokens suppression -> penalties -> greedy rows take
argmax; the rest: temperature -> top-k/top-p -> min-p -> softmax -> exponential-race sampling
(``argmax(p / q)`` with ``q ~ Exp(1)``), where a seeded row draws ``q`` from a generator seeded by
``(seed, output index)``: the draw of token i depends on nothing but the seed and i, so a request
gives the same tokens whether one engine runs it or a prefill and a decode worker split it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pdmesh.engine.sequence import Sequence, TokenLogprob

_SEED_MIX = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class SamplingBatch:
    temperature: torch.Tensor  # [B] float32
    top_p: Optional[torch.Tensor]  # [B] float32
    top_k: Optional[torch.Tensor]  # [B] int64 (vocab size where disabled)
    min_p: Optional[torch.Tensor]  # [B] float32
    presence: Optional[torch.Tensor]  # [B, 1]
    frequency: Optional[torch.Tensor]  # [B, 1]
    repetition: Optional[torch.Tensor]  # [B, 1]
    output_ids: Optional[torch.Tensor]  # [B, max_out] int64 padded with vocab (dropped)
    prompt_ids: Optional[torch.Tensor]  # [B, max_prompt] int64 padded with vocab
    suppress: Optional[list[tuple[int, list[int]]]]  # (row, token ids) masked to -inf
    bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # logit_bias: rows [K], token ids [K] int64, biases [K] float32
    seeds: list[Optional[int]]  # per row: seed for this draw (already mixed with index)
    all_greedy: bool
    max_logprobs: int  # -1: none requested


def _pad(rows: list[list[int]], fill: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device)


def plain_greedy(seq: Sequence) -> bool:
    """Argmax alone decides this row: greedy, no penalties, no logit bias, no logprobs, no
    suppressed ids (a grammar's mask is applied to the logits before)."""
    p = seq.params
    return (p.greedy and not p.has_penalties and p.logprobs is None and not p.logit_bias
            and (p.min_tokens == 0 or seq.num_output_tokens >= p.min_tokens))


def _vec(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list -> device tensor without waiting for the stream (torch.tensor(...,
    device=cuda) would block until the step in flight is done)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def build_sampling_batch(seqs: list[Sequence], vocab: int, device: torch.device,
                         offsets: Optional[list[int]] = None) -> SamplingBatch:
    """One row per entry of ``seqs``; row i samples its sequence's output token
    ``num_output_tokens + offsets[i]`` (offsets: 0 for every row unless given; verify steps of
    speculative decoding repeat a sequence with offsets 0..K; penalties read the sequence's
    output as it is, so rows with offsets must have none)."""
    ps = [s.params for s in seqs]
    offs = offsets or [0] * len(seqs)
    temps = _vec([p.temperature for p in ps], torch.float32, device)
    any_topp = any(p.top_p < 1.0 for p in ps)
    any_topk = any(p.top_k > 0 for p in ps)
    any_minp = any(p.min_p > 0 for p in ps)
    any_pen = any(p.has_penalties for p in ps)
    any_rep = any(p.repetition_penalty != 1.0 for p in ps)
    suppress = []
    for i, s in enumerate(seqs):
        if s.num_output_tokens + offs[i] < s.params.min_tokens and s.grammar is None:  # a grammar decides its end
            ids = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else list(s.eos_token_ids))
            if ids:
                suppress.append((i, ids))
    bias_rows = [(i, t, b) for i, p in enumerate(ps) for t, b in p.logit_bias if t < vocab]
    seeds = [
        None if s.params.seed is None else (s.params.seed * _SEED_MIX + s.num_output_tokens + off) & 0x7FFF_FFFF_FFFF_FFFF
        for s, off in zip(seqs, offs)
    ]
    return SamplingBatch(
        temperature=temps,
        top_p=_vec([p.top_p for p in ps], torch.float32, device) if any_topp else None,
        top_k=_vec([p.top_k if p.top_k > 0 else vocab for p in ps], torch.int64, device) if any_topk else None,
        min_p=_vec([p.min_p for p in ps], torch.float32, device) if any_minp else None,
        presence=torch.tensor([[p.presence_penalty] for p in ps], dtype=torch.float32, device=device) if any_pen else None,
        frequency=torch.tensor([[p.frequency_penalty] for p in ps], dtype=torch.float32, device=device) if any_pen else None,
        repetition=torch.tensor([[p.repetition_penalty] for p in ps], dtype=torch.float32, device=device) if any_rep else None,
        output_ids=_pad([s.output_token_ids for s in seqs], vocab, device) if any_pen else None,
        prompt_ids=_pad([s.token_ids[: s.num_prompt_tokens] for s in seqs], vocab, device) if any_rep else None,
        suppress=suppress or None,
        bias=(_vec([r for r, _, _ in bias_rows], torch.int64, device), _vec([t for _, t, _ in bias_rows], torch.int64, device),
              _vec([b for _, _, b in bias_rows], torch.float32, device)) if bias_rows else None,
        seeds=seeds,
        all_greedy=all(p.greedy for p in ps),
        max_logprobs=max((p.logprobs for p in ps if p.logprobs is not None), default=-1),
    )


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, seqs: list[Sequence]) -> tuple[list[int], list[Optional[TokenLogprob]]]:
        """logits: [B, V] float32 -> sampled ids and per-row logprobs (None where not asked)."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs >= 0 else None
        ids = self.sample(logits, batch)
        id_list = ids.tolist()
        return id_list, self._logprobs(raw_logprobs, ids, batch, seqs)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits: [B, V] float32 -> sampled ids [B] int64, on the device (no host sync)."""
        logits = self._apply_penalties(logits, batch)
        greedy_ids = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy_ids
        return torch.where(batch.temperature == 0, greedy_ids, self._sample(logits, batch))

    def _apply_penalties(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        if b.bias is not None:
            logits = logits.index_put(b.bias[:2], b.bias[2], accumulate=True)
        if b.suppress:
            logits = logits.clone()
            for row, toks in b.suppress:
                logits[row, toks] = float("-inf")
        if b.output_ids is None and b.repetition is None:
            return logits
        nb, vocab = logits.shape
        if b.output_ids is not None:
            counts = torch.zeros((nb, vocab + 1), dtype=torch.float32, device=logits.device)
            counts.scatter_add_(1, b.output_ids, torch.ones_like(b.output_ids, dtype=torch.float32))
            counts = counts[:, :vocab]
        else:
            counts = None
        if b.repetition is not None:
            seen = torch.zeros((nb, vocab + 1), dtype=torch.bool, device=logits.device)
            assert b.prompt_ids is not None  # built with repetition (build_sampling_batch)
            seen.scatter_(1, b.prompt_ids, True)
            if b.output_ids is not None:
                seen.scatter_(1, b.output_ids, True)
            seen = seen[:, :vocab]
            penalised = torch.where(logits > 0, logits / b.repetition, logits * b.repetition)
            logits = torch.where(seen, penalised, logits)
        if counts is not None:
            assert b.frequency is not None and b.presence is not None  # built with output_ids
            logits = logits - b.frequency * counts - b.presence * (counts > 0).float()
        return logits

    def _sample(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        temp = torch.where(b.temperature == 0, torch.ones_like(b.temperature), b.temperature)
        logits = logits / temp[:, None]
        if b.top_k is not None or b.top_p is not None:
            logits = _top_k_top_p(logits, b.top_k, b.top_p)
        probs = torch.softmax(logits, dim=-1)
        if b.min_p is not None:
            top = probs.max(dim=-1, keepdim=True).values
            probs = torch.where(probs < b.min_p[:, None] * top, torch.zeros_like(probs), probs)
        q = torch.empty_like(probs)
        q.exponential_(generator=self.generator)
        for row, seed in enumerate(b.seeds):
            if seed is not None:
                gen = torch.Generator(device=probs.device)
                gen.manual_seed(seed)
                q[row].exponential_(generator=gen)
        return (probs / q).argmax(dim=-1)

    @staticmethod
    def _logprobs(raw: Optional[torch.Tensor], ids: torch.Tensor, b: SamplingBatch, seqs: list[Sequence]) -> list[Optional[TokenLogprob]]:
        if raw is None:
            return [None] * len(seqs)
        chosen = raw.gather(1, ids[:, None]).squeeze(1).tolist()
        k = max(b.max_logprobs, 0)
        top_v, top_i = (raw.topk(k, dim=-1) if k > 0 else (None, None))
        top_vals = top_v.tolist() if top_v is not None else None
        top_ids = top_i.tolist() if top_i is not None else None
        out: list[Optional[TokenLogprob]] = []
        id_list = ids.tolist()
        for row, s in enumerate(seqs):
            n = s.params.logprobs
            if n is None:
                out.append(None)
                continue
            top = list(zip(top_ids[row][:n], top_vals[row][:n])) if n and top_ids is not None and top_vals is not None else []
            out.append(TokenLogprob(id_list[row], chosen[row], top))
        return out


def _top_k_top_p(logits: torch.Tensor, k: Optional[torch.Tensor], p: Optional[torch.Tensor]) -> torch.Tensor:
    sorted_logits, idx = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if k is not None:
        kth = sorted_logits.gather(1, (vocab - k.clamp(max=vocab))[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = cum <= (1 - p[:, None])
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, sorted_logits)
