"""The model runner: turns a scheduled batch into tensors, runs the model, samples.

``prepare`` builds flat ``input_ids``/``positions``/``slot_mapping`` with one numpy op per
sequence (never per token), ``plan`` is called once, and the model runs once over all tokens.

Two ways to run a step:

* ``run(batch)``: launch and wait for the sampled tokens (every kind of step).
* ``launch(batch, prev)`` then ``collect(step)`` (async scheduling, decode steps): the kernels
  are queued and the sampled ids stay on the device; the host gets them in ``collect`` from a
  pinned buffer, so the engine can schedule and launch step N+1 before it waits for step N.
  A token of step N that step N+1 takes as input is written into ``Sequence.token_ids`` as the
  placeholder ``-(row + 1)`` (its row in step N's sampled ids) and resolved on the device.
  ``launch`` is ``launch_forward`` (the model, up to the logits) then ``launch_sample`` (mask,
  sampling, the copy of the ids to the host); a constrained step calls them apart: its forward
  needs no mask, only its sampling does, so the engine launches step N+1's forward, collects
  step N, advances the grammars by step N's tokens and fills N+1's mask while the device runs
  that forward, and launches N+1's sampling after.

Host buffers that the device reads asynchronously (the packed inputs, FlashInfer's pinned plan
buffers) are written only after the previous step's inputs were consumed (``_InputFence``).

Tensor parallelism: ``prepare`` (rank 0: sequences and block tables) turns a batch into a
``StepInputs`` — plain arrays, no sequences — and ``execute`` runs it: on rank 0 it first sends it
to the other ranks (``followers``), which run the same ``execute`` on their shards, so every rank
makes the same collectives in the same order (forward, prompt-logprob logits, sampled logits, and
for launched steps the broadcast of the sampled ids that the next step's placeholders name).
Sampling, grammars and logprobs happen on rank 0 only.

Speculative decoding (``pdmesh.engine.spec_decode``): a sequence with K draft tokens runs its last
token and the drafts (1 + K positions) in one step, and all 1 + K rows are sampled
(``StepResult.targets``; every rank computes those rows' logits).  A verify step whose rows fit a
captured decode graph runs as one-query decode rows (``StepInputs.decode_rows``, decided by rank 0).
Verify steps are always waited for (``run``), never launched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

import numpy as np
import torch

from pdmesh.attention import BaseAttentionBackend, BatchLayout, StepAttention
from pdmesh.engine.sampler import Sampler, SamplingBatch, build_sampling_batch, plain_greedy
from pdmesh.engine.scheduler import ScheduledBatch
from pdmesh.engine.sequence import Sequence, TokenLogprob
from pdmesh.kv.block_manager import PrefixCachingBlockManager
from pdmesh.kv.pool import KVCachePool
from pdmesh.models.transformer import CausalLM

if TYPE_CHECKING:  # imported only on the CUDA paths that use them
    from pdmesh.attention.flashinfer_backend import FlashInferBackend
    from pdmesh.engine.cuda_graphs import DecodeGraphs


def placeholder(row: int) -> int:
    """The token id standing for row ``row`` of the in-flight step's sampled ids."""
    return -(row + 1)


@dataclass
class StepInputs:
    """One step as every rank runs it: built by rank 0's ``prepare``, sent to the other ranks."""

    packed: np.ndarray
    """[3, T] int64: token ids (``placeholder(row)`` for a token the in-flight step samples),
    positions, cache slots."""
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[np.ndarray]
    """Per sequence: its block ids (int32)."""
    logits_idx: list[int]
    """Rows of the step's hidden states whose next token is sampled."""
    prompt_rows: list[tuple[int, int]] = field(default_factory=list)
    """Row ranges whose logits give prompt logprobs, in sequence order."""
    launch: bool = False
    """Async scheduling: the sampled ids are broadcast to every rank (the next step's placeholders)."""
    decode_rows: bool = False
    """A verify step run as one-query decode rows (``BatchLayout.as_decode_rows``), graphs included."""


@dataclass
class StepTensors:
    """What ``execute`` computed on this rank."""

    hidden: torch.Tensor
    """[T, hidden]."""
    logits: Optional[torch.Tensor]
    """[len(logits_idx), vocab] float32 (every rank under TP: gathered), None without rows to sample."""
    prompt_logits: list[torch.Tensor]
    """Per ``prompt_rows`` range: [rows, vocab] float32."""


@dataclass
class LaunchedStep:
    """A step whose kernels are queued; its sampled ids reach the host in ``collect``.  Between
    ``launch_forward`` and ``launch_sample`` only the forward is queued: ``logits`` is set and the
    id fields are None."""

    batch: ScheduledBatch
    sample_seqs: list[Sequence]
    """Sequences that get a token from this step, in row order."""
    logits: Optional[torch.Tensor] = None
    """[S, V] float32 on the model's device, until the sampling is launched (then None)."""
    sampling: Optional[SamplingBatch] = None
    """The rows' sampling parameters (None: every row is plain greedy), built with the forward."""
    ids: Optional[torch.Tensor] = None
    """[S] int64 on the model's device: sampled token ids (the next step's inputs)."""
    host_ids: Optional[torch.Tensor] = None
    """[S] int64 on the host (pinned on CUDA): filled once ``ready`` has completed."""
    ready: Optional[torch.cuda.Event] = None
    """Recorded after the device-to-host copy (None on CPU, where ``host_ids`` is ready at once)."""

    @property
    def sampled(self) -> bool:
        """Whether the sampling is launched (the ids exist, on the device at least)."""
        return self.ids is not None


class _InputFence:
    """CUDA: an event recorded once a step's host-to-device input copies (ours and the attention
    plan's) are queued; the next step waits on it before it rewrites those host buffers."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.event: Optional[torch.cuda.Event] = None

    def mark(self) -> None:
        if self.cuda:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(self.device))

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


@dataclass
class StepResult:
    """Sampled tokens for the sequences that completed their pending tokens this step."""

    sampled_seqs: list[Sequence]
    token_ids: list[int]
    logprobs: list[Optional[TokenLogprob]]
    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]] = field(default_factory=list)
    """Logprobs of the prompt tokens this step computed, for sequences that asked (in order)."""
    targets: Optional[list[list[int]]] = None
    """Verify steps only: per sampled sequence, the tokens sampled at its 1 + K rows (K: its
    draft tokens; ``token_ids`` then holds each list's first)."""
    target_logprobs: Optional[list[list[Optional[TokenLogprob]]]] = None
    """Verify steps only: the logprobs of ``targets`` (None where not asked)."""


LogitsMask = Callable[[torch.Tensor, list[Sequence]], None]
"""Masks a step's logits [S, V] (float32, on the device) in place, given the S sampled sequences
(the engine's grammar mask); called after the forward pass is launched."""


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVCachePool, blocks: Optional[PrefixCachingBlockManager],
                 backend: BaseAttentionBackend, device: torch.device, followers: Any = None) -> None:
        """``blocks``: rank 0's block manager (None on other ranks, which never ``prepare``);
        ``followers``: rank 0's handle on the other ranks (``RankGroup``), None without TP."""
        self.model = model
        self.tp = model.tp
        self.followers = followers
        self.pool = pool
        self.blocks = blocks
        self.backend = backend
        self.device = device
        self.sampler = Sampler(device)
        self.block_size = pool.block_size
        self._pinned: Optional[torch.Tensor] = None
        self._host_ids: list[torch.Tensor] = []
        """Two pinned int64 buffers (at least 256 ids, grown to the batch), used in turn by launched steps (CUDA)."""
        self._turn = 0
        self._fence = _InputFence(device)
        self.graphs: Optional[DecodeGraphs] = None
        """``DecodeGraphs`` when CUDA graphs are captured (``capture_decode_graphs``)."""
        self.verify_as_decode: Optional[bool] = None
        """Run verify steps (speculative decoding) as decode rows (``BatchLayout.as_decode_rows``):
        None: when the rows fit a captured CUDA graph; True/False: always/never (tests)."""

    @property
    def _rank0_blocks(self) -> PrefixCachingBlockManager:
        """The block manager: rank 0 holds one, and only rank 0 prepares steps."""
        assert self.blocks is not None, "only rank 0 prepares steps"
        return self.blocks

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        from pdmesh.engine.cuda_graphs import DecodeGraphs

        # the engine captures graphs only when its backend is flashinfer
        self.graphs = DecodeGraphs(self.model, cast("FlashInferBackend", self.backend), self.pool.kv, max_num_seqs, max_model_len,
                                   self.block_size, self.pool.null_block, self.device)

    def _to_device(self, packed: np.ndarray) -> torch.Tensor:
        """[3, T] int64 (ids, positions, slots) -> device, in one copy (from pinned memory on CUDA)."""
        host = torch.from_numpy(packed)
        if self.device.type != "cuda":
            return host
        t = packed.shape[1]
        if self._pinned is None or self._pinned.shape[1] < t:
            self._pinned = torch.empty((3, max(t, 4096)), dtype=torch.int64, pin_memory=True)
        self._pinned[:, :t].copy_(host)
        return self._pinned[:, :t].to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch, launch: bool = False) -> tuple[StepInputs, list[Sequence]]:
        """Rank 0: the step description of ``batch`` and the sequences it samples."""
        if all(n == 1 for n in batch.num_new_tokens):
            packed, ctx_lens, logits_idx, sample_seqs = self._one_token_each(batch)
        else:
            packed, ctx_lens, logits_idx, sample_seqs = self._token_ranges(batch)
        tables = [self._rank0_blocks.block_table_array(seq.request_id) for seq in batch.seqs]
        rows = [(a, b) for _, a, b, _, _ in self._prompt_spans(batch)]
        return StepInputs(packed, list(batch.num_new_tokens), ctx_lens, tables, logits_idx, rows, launch,
                          self._as_decode_rows(batch, ctx_lens)), sample_seqs

    def _as_decode_rows(self, batch: ScheduledBatch, ctx_lens: list[int]) -> bool:
        """Whether a verify step (every sequence runs its last token and its drafts, some have
        drafts) runs as one-query decode rows: where they fit a captured graph (``verify_as_decode``)."""
        if self.verify_as_decode is False or not any(s.spec_token_ids for s in batch.seqs):
            return False
        if any(n != 1 + len(s.spec_token_ids) for s, n in zip(batch.seqs, batch.num_new_tokens)):
            return False
        return bool(self.verify_as_decode) or (self.graphs is not None and self.graphs.fits(sum(batch.num_new_tokens), max(ctx_lens)))

    def execute(self, inputs: StepInputs, prev_ids: Optional[torch.Tensor] = None) -> StepTensors:
        """Every rank: run the step's model forward and the logits it needs (rank 0 first sends the
        step to the other ranks).  ``prev_ids`` ([S] int64, device): the in-flight step's sampled ids,
        which placeholder tokens name."""
        if self.followers is not None:
            self.followers.send_step(inputs)
        self._fence.wait()
        packed = inputs.packed
        dev = self._to_device(packed)
        input_ids = dev[0]
        if packed[0].min() < 0:  # tokens still on the device, sampled by the in-flight step
            if prev_ids is None:
                raise RuntimeError("a placeholder token without the step that samples it")
            input_ids = torch.where(input_ids < 0, prev_ids[(-input_ids - 1).clamp(min=0)], input_ids)
        layout = BatchLayout(inputs.query_lens, inputs.context_lens, inputs.block_tables, dev[2], self.block_size)
        if inputs.decode_rows:
            layout = layout.as_decode_rows()
        if self.graphs is not None and self.graphs.can_run(layout):
            hidden = self.graphs.run(input_ids, dev[1], layout, on_loaded=self._fence.mark)
        else:
            plan = self.backend.plan(layout)
            self._fence.mark()
            hidden = self.model(input_ids, dev[1], StepAttention(self.backend, plan, self.pool.kv))
        prompt_logits = [self.model.compute_logits(hidden[a:b]) for a, b in inputs.prompt_rows]
        logits = self._logits(hidden, inputs.logits_idx) if inputs.logits_idx else None
        return StepTensors(hidden, logits, prompt_logits)

    def share_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """A launched step's sampled ids [S] int64 on every rank (rank 0's, broadcast)."""
        return self.tp.broadcast(ids)

    def _one_token_each(self, batch: ScheduledBatch) -> tuple[np.ndarray, list[int], list[int], list[Sequence]]:
        """Decode steps (one new token per sequence), in plain ints: ([3, B] int64 ids, positions,
        slots), context lengths, rows to sample, sequences sampled."""
        bs = self.block_size
        ids, pos, slots, ctx_lens, logits_idx, sample_seqs = [], [], [], [], [], []
        for row, seq in enumerate(batch.seqs):
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(self._rank0_blocks.block_table(seq.request_id)[p // bs] * bs + p % bs)
            ctx_lens.append(p + 1)
            if p + 1 == len(seq.token_ids):
                logits_idx.append(row)
                sample_seqs.append(seq)
        return np.array((ids, pos, slots), dtype=np.int64), ctx_lens, logits_idx, sample_seqs

    def _token_ranges(self, batch: ScheduledBatch) -> tuple[np.ndarray, list[int], list[int], list[Sequence]]:
        """Any step (prompt chunks): one numpy op per sequence, never per token."""
        ids, pos, slots = [], [], []
        ctx_lens: list[int] = []
        logits_idx: list[int] = []
        sample_seqs: list[Sequence] = []
        offset = 0
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            p = np.arange(start, end, dtype=np.int64)
            ids.append(np.asarray(seq.token_ids[start:end] + seq.spec_token_ids, dtype=np.int64))
            pos.append(p)
            slots.append(self._rank0_blocks.block_table_array(seq.request_id)[p // bs].astype(np.int64) * bs + p % bs)
            ctx_lens.append(end)
            offset += n
            k = len(seq.spec_token_ids)
            if end == seq.num_tokens + k:  # (a verify step: its last 1 + K rows are sampled)
                logits_idx.extend(range(offset - 1 - k, offset))
                sample_seqs.append(seq)
        packed = np.stack([np.concatenate(ids), np.concatenate(pos), np.concatenate(slots)])
        return packed, ctx_lens, logits_idx, sample_seqs

    def _logits(self, hidden: torch.Tensor, logits_idx: list[int]) -> torch.Tensor:
        if len(logits_idx) != hidden.shape[0]:  # some sequences were mid-prefill: pick last tokens
            hidden = hidden[torch.tensor(logits_idx, device=self.device)]
        return self.model.compute_logits(hidden)

    def forward(self, batch: ScheduledBatch) -> tuple[Optional[torch.Tensor], list[Sequence]]:
        """Rank 0: run the model over the batch; logits [N, vocab] (float32) of the sequences whose
        pending tokens are all computed by this step, and those sequences."""
        inputs, sample_seqs = self.prepare(batch)
        return self.execute(inputs).logits, sample_seqs

    @staticmethod
    def _prompt_spans(batch: ScheduledBatch) -> list[tuple[Sequence, int, int, int, int]]:
        """For sequences that asked for prompt logprobs and compute predecessors of prompt tokens
        this step: (seq, first row, end row, lo, hi) — hidden row of position p scores prompt token
        p + 1, for positions lo..hi-1."""
        out = []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, done = seq.num_computed_tokens, len(seq.prompt_logprobs)
            lo, hi = max(start, done), min(start + n, seq.num_prompt_tokens - 1)
            if seq.wants_prompt_logprobs and lo < hi:
                out.append((seq, offset + lo - start, offset + hi - start, lo, hi))
            offset += n
        return out

    def _prompt_logprobs(self, step: StepTensors, batch: ScheduledBatch) -> list[tuple[Sequence, list[TokenLogprob]]]:
        """Logprobs of the prompt tokens whose predecessors this step computed (their logprob, rank, top-k)."""
        out: list[tuple[Sequence, list[TokenLogprob]]] = []
        for (seq, _, _, lo, hi), logits in zip(self._prompt_spans(batch), step.prompt_logits):
            lps = torch.log_softmax(logits, dim=-1)
            nxt = torch.tensor(seq.token_ids[lo + 1:hi + 1], dtype=torch.int64, device=logits.device)
            chosen = lps.gather(1, nxt[:, None])
            ranks = (lps > chosen).sum(dim=1) + 1
            k = seq.params.prompt_logprobs or 0
            top_v, top_i = lps.topk(k, dim=-1) if k else (lps[:, :0], lps[:, :0].long())
            out.append((seq, [TokenLogprob(t, lp, list(zip(ti, tv)), r) for t, lp, ti, tv, r in zip(
                nxt.tolist(), chosen.squeeze(1).tolist(), top_i.tolist(), top_v.tolist(), ranks.tolist())]))
        return out

    @torch.inference_mode()
    def follow(self, inputs: StepInputs, prev_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Ranks other than 0: run a step rank 0 sent; for a launched step, returns the sampled ids
        rank 0 broadcast (the next step's ``prev_ids``)."""
        self.execute(inputs, prev_ids)
        if not inputs.launch:
            return prev_ids
        return self.share_ids(torch.empty(len(inputs.logits_idx), dtype=torch.int64, device=self.device))

    def launch(self, batch: ScheduledBatch, prev: Optional[LaunchedStep] = None,
               mask: Optional[LogitsMask] = None) -> LaunchedStep:
        """Queue a whole step (forward and sampling) that samples every sequence of ``batch``
        without logprobs or penalties (async scheduling); ``prev`` is the in-flight step whose
        placeholders it takes as input, ``mask`` (the engine's grammar mask) constrains the logits."""
        step = self.launch_forward(batch, prev)
        self.launch_sample(step, mask)
        return step

    @torch.inference_mode()
    def launch_forward(self, batch: ScheduledBatch, prev: Optional[LaunchedStep] = None) -> LaunchedStep:
        """Queue the model over a decode batch, up to the logits (every rank runs it); ``launch_sample``
        queues the rest.  ``prev`` (sampled already) resolves placeholder tokens."""
        if prev is not None and not prev.sampled:
            raise RuntimeError("the previous step's sampling was never launched")
        inputs, sample_seqs = self.prepare(batch, launch=True)
        if len(sample_seqs) != len(batch.seqs) or not sample_seqs or any(s.spec_token_ids for s in sample_seqs):
            raise RuntimeError("launch() takes decode batches (without draft tokens) only")
        logits = self.execute(inputs, prev.ids if prev is not None else None).logits
        assert logits is not None  # every sequence is sampled, so the step computed their logits
        sampling = None
        if not all(plain_greedy(s) for s in sample_seqs):
            sampling = build_sampling_batch(sample_seqs, logits.shape[-1], self.device)
        return LaunchedStep(batch, sample_seqs, logits, sampling)

    @torch.inference_mode()
    def launch_sample(self, step: LaunchedStep, mask: Optional[LogitsMask] = None) -> None:
        """Queue the sampling of a step whose forward is queued: ``mask`` (called with the logits
        and the rows' sequences) first, then the sampler, the broadcast of the ids to the other
        tensor-parallel ranks (they wait for it in ``follow``), then the copy of the ids to the host."""
        logits = step.logits
        if logits is None:
            raise RuntimeError("launch_sample() needs a step from launch_forward(), sampled at most once")
        step.logits = None
        if mask is not None:
            mask(logits, step.sample_seqs)
        ids = logits.argmax(dim=-1) if step.sampling is None else self.sampler.sample(logits, step.sampling)
        ids = self.share_ids(ids)
        step.ids = ids
        if self.device.type != "cuda":
            step.host_ids = ids
            return
        n = ids.shape[0]
        if not self._host_ids or self._host_ids[0].shape[0] < n:
            self._host_ids = [torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._turn ^= 1
        host = self._host_ids[self._turn][:n]
        host.copy_(ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # the stream of the copy above, on this device
        step.host_ids, step.ready = host, ready

    @staticmethod
    def collect(step: LaunchedStep) -> StepResult:
        """Wait for a launched step's sampled ids (and nothing queued after them)."""
        if step.host_ids is None:
            raise RuntimeError("collect() of a step whose sampling was never launched")
        if step.ready is not None:
            step.ready.synchronize()
        return StepResult(step.sample_seqs, step.host_ids.tolist(), [None] * len(step.sample_seqs))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, mask: Optional[LogitsMask] = None) -> StepResult:
        """One step, waited for; ``mask`` (the engine's grammar mask) constrains the logits."""
        inputs, sample_seqs = self.prepare(batch)
        step = self.execute(inputs)
        prompt_lps = self._prompt_logprobs(step, batch) if step.prompt_logits else []
        if not sample_seqs:
            return StepResult([], [], [], prompt_lps)
        if any(s.spec_token_ids for s in sample_seqs):
            return self._verify(step.logits, sample_seqs, prompt_lps, mask)
        logits = step.logits
        assert logits is not None  # sequences are sampled, so the step computed their logits
        if mask is not None:
            mask(logits, sample_seqs)
        if all(plain_greedy(s) for s in sample_seqs):
            return StepResult(sample_seqs, logits.argmax(dim=-1).tolist(), [None] * len(sample_seqs), prompt_lps)
        sb = build_sampling_batch(sample_seqs, logits.shape[-1], self.device)
        tokens, logprobs = self.sampler(logits, sb, sample_seqs)
        return StepResult(sample_seqs, tokens, logprobs, prompt_lps)

    def _verify(self, logits: Optional[torch.Tensor], seqs: list[Sequence], prompt_lps: list[tuple[Sequence, list[TokenLogprob]]],
                mask: Optional[LogitsMask]) -> StepResult:
        """A verify step (speculative decoding): ``logits`` [sum(1 + K_i), V] holds the 1 + K_i rows
        of every sampled sequence (K_i: its drafts, 0 for most); a target token is sampled from each,
        row ``j`` as the sequence's output token ``num_output_tokens + j`` (``pdmesh.engine.spec_decode``
        decides what is accepted).  Sequences with drafts have no grammar or penalties; ``mask``
        constrains the one row of each sequence with a grammar."""
        assert logits is not None  # sequences are sampled, so the step computed their logits
        counts = [1 + len(s.spec_token_ids) for s in seqs]
        row_seqs = [s for s, c in zip(seqs, counts) for _ in range(c)]
        offsets = [j for c in counts for j in range(c)]
        if mask is not None:
            constrained = [r for r, s in enumerate(row_seqs) if s.grammar is not None]
            sub = logits[constrained]
            mask(sub, [row_seqs[r] for r in constrained])
            logits[constrained] = sub
        lps: list[Optional[TokenLogprob]]
        if all(plain_greedy(s) for s in seqs):
            flat, lps = logits.argmax(dim=-1).tolist(), [None] * len(row_seqs)
        else:
            sb = build_sampling_batch(row_seqs, logits.shape[-1], self.device, offsets)
            flat, lps = self.sampler(logits, sb, row_seqs)
        targets, target_lps, i = [], [], 0
        for c in counts:
            targets.append(flat[i:i + c])
            target_lps.append(lps[i:i + c])
            i += c
        return StepResult(seqs, [t[0] for t in targets], [lp[0] for lp in target_lps], prompt_lps, targets, target_lps)
