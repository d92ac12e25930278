"""``LLMEngine``: one model, one KV pool, one scheduler; ``step() = schedule -> run -> postprocess``.

Not thread-safe: exactly one thread (the worker's engine thread, or the caller of ``LLM``) calls
it.  Roles in the mesh:

* colocated / offline: ``add_request`` then ``step`` until finished.
* prefill: ``add_request(prefill_only=True)``: after the prompt it samples the first token; if
  the request goes on, its blocks are kept (status HELD) and reported in the output, until
  ``release(request_id)``.
* decode: ``admit_remote`` allocates blocks for a prompt computed elsewhere (reusing local prefix
  cache hits) and returns which of them must be filled; ``start_pull`` hands the transfer to the
  KV connector (``pdmesh.engine.connector``), which polls it between steps and, when it ends,
  queues the request to generate from its first token (pulled), to compute its prompt here
  (recomputed) or drops it (failed) (``pdmesh.engine.arrivals``, which lower-tier loads go through
  too).  ``pdmesh.transport.handoff`` drives this from asyncio.

KV ownership: every allocated block belongs to exactly the request ids in the block manager;
``abort``/``release``/finishing free them at once — except that blocks of a request that a
launched, not yet collected step still writes are freed when that step is collected, and blocks
that a stopped KV transfer may still write wait in the connector's quarantine until it reports
stopped (a block must never change hands while anything may write it: the next owner's KV may
arrive on another stream).

Async scheduling (``--async-scheduling``): in steady decoding, ``step()`` schedules and launches
step N+1 before it collects step N, so the host's work for N+1 (schedule, inputs, attention
plan) overlaps N on the GPU and each call returns step N's outputs (one step behind).  Step N's
tokens are placeholders in ``Sequence.token_ids`` until collected (see ``runner``).  Whenever the
next step could not be launched that way (prompt tokens to run, waiting requests, too few free
blocks to grow every sequence without preempting, a sequence that ends by length at step N, or
one with penalties or logprobs), ``step()`` first collects N and goes on synchronously.

Structured outputs: a request whose params carry a ``GrammarSpec`` gets a grammar state from the
engine's ``GrammarEngine`` (compiled against this worker's tokenizer, cached per spec); its logits
are masked before sampling and every emitted token advances the state (see ``grammar``).  With
async scheduling a batch with grammars is launched behind too, in two parts: step N+1's forward
(which needs no mask) before step N is collected, its sampling after — once N's tokens have
advanced the grammars and N+1's mask is filled, while the device runs N+1's forward.  A row whose
sequence ended at step N (or was aborted) is left unmasked and its token dropped; a grammar state
is released when its sequence finishes or is aborted.

Speculative decoding (``--speculative-config``, ``spec_decode``): before a synchronous step every
running sequence that may speculate gets n-gram draft tokens; the step verifies them (1 + K rows
sampled) and ``postprocess`` keeps the accepted drafts plus one token, returning blocks that hold
only rejected drafts' KV at once.  A step with drafts is never launched behind, and a sequence that
may propose keeps the next step from being launched behind (its proposal needs its last token).
Constrained, penalised and prefill-only sequences never get drafts; they share verify steps with
those that do (a constrained sequence's one row is masked there).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import torch

from pdmesh.config import EngineConfig
from pdmesh.distributed.devices import rank_devices
from pdmesh.distributed.group import TPGroup
from pdmesh.distributed.ranks import RankGroup
from pdmesh.engine.devices import on_device, pick_device, pick_dtype  # noqa: F401 (re-exported)
from pdmesh.engine.connector import KVConnector, PullJob, PullOutcome, PullReport
from pdmesh.engine.arrivals import Arrivals
from pdmesh.engine.offload import KVTiers, TierLoadJob
from pdmesh.engine.grammar import GrammarEngine, GrammarError, GrammarSpec
from pdmesh.engine.runner import LaunchedStep, placeholder
from pdmesh.engine.scheduler import Scheduler
from pdmesh.engine.stats import EngineStats, RemoteAdmission  # noqa: F401 (re-exported)
from pdmesh.engine.sequence import RequestOutput, SamplingParams, Sequence, SequenceStatus, TokenLogprob
from pdmesh.engine.spec_decode import SpecDecoder, may_propose
from pdmesh.kv.audit import KVAudit
from pdmesh.kv.block_manager import PrefixCachingBlockManager
from pdmesh.kv.events import KVEventLog
from pdmesh.engine.shard import build_shard
from pdmesh.models import check_tensor_parallel
from pdmesh.models.loader import ResolvedModel, resolve
from pdmesh.models.quant import check_quantization
from pdmesh.transport.base import TransferError
from pdmesh.transport.cuda_ipc import open_share
from pdmesh.tokenizer import Tokenizer, has_tokenizer

log = logging.getLogger(__name__)

def _launchable(seq: Sequence) -> bool:
    """A sequence whose next step can be launched before the host sees its previous token (a
    grammar's mask needs that token, but only the sampling waits for it: see ``LLMEngine._step``)."""
    return not seq.prefill_only and not seq.params.has_penalties and seq.params.logprobs is None


class RequestRejected(ValueError):
    """A request can never run here (too long, or larger than the whole KV pool)."""


class LLMEngine:
    def __init__(self, config: EngineConfig, resolved: Optional[ResolvedModel] = None,
                 kv_events: Optional[KVEventLog] = None) -> None:
        self.config = config
        self.device = pick_device(config.device.device)
        self.kv_events = kv_events
        """Where the prefix hashes this engine holds, per tier, are recorded as they change (workers
        whose prompts are routed by cached prefix publish them); None: not recorded."""
        with on_device(self.device):
            self._build(config, resolved)

    def _build(self, config: EngineConfig, resolved: Optional[ResolvedModel]) -> None:
        if self.device.type == "cpu" and config.device.cpu_threads:
            torch.set_num_threads(config.device.cpu_threads)
        self.dtype = pick_dtype(config.model.dtype, self.device)
        self.resolved = resolved or resolve(config.model)
        arch = self.resolved.arch
        self.arch = arch
        self.max_model_len = config.model.max_model_len or arch.max_position_embeddings
        tp_size = config.device.tensor_parallel_size
        check_tensor_parallel(arch, tp_size, config.device.enable_expert_parallel)
        check_quantization(arch, config.model.quantization)
        self.ranks: Optional[RankGroup] = None
        """The other ranks of this worker's tensor-parallel group (None without TP)."""
        if tp_size > 1:
            devices = rank_devices(config.device.device, tp_size)
            self.device = devices[0]
            self.ranks = RankGroup(config, self.resolved, devices)
        try:
            self.tp = self.ranks.join() if self.ranks is not None else TPGroup.single(self.device)
            shard = build_shard(config, self.resolved, self.tp, self.dtype, self.max_model_len)
        except BaseException:
            self.close()
            raise
        self.model, self.pool, self.backend, self.runner = shard.model, shard.pool, shard.backend, shard.runner
        num_blocks = shard.num_blocks
        path = self.resolved.tokenizer_path
        self.tokenizer: Optional[Tokenizer] = Tokenizer(path) if has_tokenizer(path) else None
        """The model's tokenizer (None for token-id-only models): its EOS ids, and grammars."""
        tok_eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else frozenset()
        self.eos_token_ids = frozenset(arch.eos_token_ids) | tok_eos | self.resolved.generation.eos_token_ids
        """Ids that end a request: the model config's, the tokenizer's and generation_config.json's."""
        self._grammars: Optional[GrammarEngine] = None
        self._grammars_lock = threading.Lock()
        self.blocks = PrefixCachingBlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.runner.blocks = self.blocks
        if self.ranks is not None:
            try:
                shares = self.ranks.wait_ready()
                self.pool.attach_ranks([open_share(x) for x in shares], shares)
            except BaseException:
                self.close()
                raise
            self.runner.followers = self.ranks
        self.audit: Optional[KVAudit] = KVAudit(self.pool) if config.cache.kv_audit else None
        """Checksums of prompt KV (``--kv-audit``), verified when blocks are freed."""
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        mode = config.scheduler.async_scheduling
        self.async_scheduling = mode == "on" or (mode == "auto" and self.device.type == "cuda")
        self._inflight: Optional[LaunchedStep] = None
        """The launched step not yet collected (async scheduling)."""
        self.num_steps_launched_behind = 0
        """Steps launched before the previous step was collected (counter)."""
        self._deferred_frees: list[tuple[LaunchedStep, str]] = []
        """Requests whose blocks are freed once that step is collected."""
        self.held: dict[str, Sequence] = {}
        self.connector = KVConnector(self.blocks)
        """Pulls, tier loads and offloads in flight, polled between steps."""
        self.spec: Optional[SpecDecoder] = SpecDecoder(config.speculative, self.max_model_len) if config.speculative else None
        """Speculative decoding (n-gram proposals, verify steps); None when off."""
        on_event = self.kv_events.record if self.kv_events is not None else None
        if on_event is not None:
            self.blocks.on_cache_event = lambda h, added: on_event("device", h, added)
        self.tiers: Optional[KVTiers] = None
        """Host-memory and disk KV tiers under the pool (``--kv-offload-cpu-gb``, ``--kv-offload-disk-*``)."""
        if config.cache.kv_offload_cpu_gb > 0:
            self.tiers = KVTiers(config.cache, config.model, self.pool, self.blocks, self.connector, self.device, on_event)
        self.arrivals = Arrivals(self.blocks, self.scheduler, self.connector, self.audit, self.tiers)
        self.remote = self.arrivals.waiting
        """Requests waiting for (or receiving) their prompt's KV from another worker or a lower tier."""
        if self.tiers is not None:
            self.scheduler.prefetch = self.arrivals.start_load
        self.num_steps = 0
        self.last_step_kind = ""
        """'decode' (one new token per sequence), 'prefill' (prompt tokens only) or 'mixed', for the
        latest step that ran a batch (step-time metrics by kind)."""
        log.info("engine ready: %s on %s/%s%s, %d KV blocks of %d tokens, attention=%s",
                 arch.architecture, self.device, self.dtype, f" (TP {tp_size})" if tp_size > 1 else "", num_blocks,
                 config.cache.block_size, self.backend.name)

    def close(self) -> None:
        """Stop the other ranks and leave the process group (engine thread; idempotent)."""
        if self.ranks is not None:
            self.ranks.stop()
            self.ranks = None
            if getattr(self, "tp", None) is not None:
                self.tp.destroy()

    # ------------------------------------------------------------------ grammars
    @property
    def grammars(self) -> GrammarEngine:
        """This engine's grammar compiler and cache (built on first use)."""
        with self._grammars_lock:  # compile_grammar may run on another thread
            if self._grammars is None:
                if self.tokenizer is None:
                    raise RequestRejected("structured outputs need the model's tokenizer; this model has none")
                self._grammars = GrammarEngine(self.tokenizer.hf, self.arch.vocab_size, sorted(self.eos_token_ids))
            return self._grammars

    def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` into the cache (thread-safe: callers may run it off the engine thread so
        that a long compile never stalls steps); RequestRejected if it is invalid."""
        try:
            self.grammars.compile(spec)
        except GrammarError as exc:
            raise RequestRejected(str(exc)) from None

    def _grammar_state(self, params: SamplingParams, replay: list[int]):
        if params.grammar is None:
            return None
        try:
            return self.grammars.new_state(params.grammar, replay)
        except GrammarError as exc:
            raise RequestRejected(str(exc)) from None

    def _mask(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """The grammar mask of a step's rows.  A sequence that ended (by the step collected since
        this one was launched, or aborted) has no grammar state any more: its row is left unmasked
        and its token dropped."""
        self.grammars.apply(logits, [s.grammar for s in seqs])

    @staticmethod
    def _constrained(seqs: list[Sequence]) -> bool:
        return any(s.grammar is not None for s in seqs)

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt_len: int, params: SamplingParams) -> None:
        if prompt_len < 1:
            raise RequestRejected("the prompt is empty")
        if prompt_len + params.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len {self.max_model_len}"
            )
        need = self.blocks.blocks_needed(prompt_len + params.max_tokens)
        if need > self.blocks.num_blocks:
            raise RequestRejected(f"request needs {need} KV blocks; this worker has {self.blocks.num_blocks}")

    def _new_seq(self, request_id: str, token_ids: list[int], prompt_len: int, params: SamplingParams, prefill_only: bool) -> Sequence:
        if self.blocks.has_request(request_id) or request_id in self.held or request_id in self.remote:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        if any(t >= self.arch.vocab_size for t, _ in params.logit_bias):
            raise RequestRejected(f"logit_bias token ids must be below the vocabulary size {self.arch.vocab_size}")
        return Sequence(request_id, token_ids, prompt_len, params, self.eos_token_ids, prefill_only=prefill_only,
                        grammar=self._grammar_state(params, token_ids[prompt_len:]))

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prefill_only: bool = False) -> None:
        self.check_request(len(prompt_token_ids), params)
        seq = self._new_seq(request_id, list(prompt_token_ids), len(prompt_token_ids), params, prefill_only)
        self.scheduler.add(seq)

    def admit_remote(self, request_id: str, prompt_token_ids: list[int], first_token: int, params: SamplingParams) -> Optional[RemoteAdmission]:
        """Allocate blocks for a prompt whose KV another worker computed; None if no room now."""
        self.check_request(len(prompt_token_ids), params)
        seq = self._new_seq(request_id, list(prompt_token_ids) + [first_token], len(prompt_token_ids), params, False)
        hit = self.blocks.lookup_prefix(seq.token_ids)
        if self.blocks.allocate(request_id, seq.num_prompt_tokens, hit) is None:
            return None
        self.blocks.record_prefix_query(seq.num_prompt_tokens, hit.num_tokens)
        seq.num_cached_tokens = hit.num_tokens
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.remote[request_id] = seq
        return RemoteAdmission(list(self.blocks.block_table(request_id)), len(hit.block_ids))

    def start_pull(self, job: PullJob) -> None:
        """Start the transfer of an admitted request's KV (``job.prepared`` None: preparing it
        failed, so it fails at the next poll).  Its outcome reaches ``job.on_outcome``."""
        rid = job.request_id
        if rid not in self.remote or self.connector.has(rid):  # aborted meanwhile (or started twice)
            if job.prepared is not None and job.prepared.close is not None:
                job.prepared.close()
            job.on_outcome(PullReport(PullOutcome.FAILED, job.transport.name, error="aborted", aborted=True))
            job.on_stopped()
            return
        dst = self.blocks.block_table(rid)[job.first_block:]
        transfer = None
        started = time.monotonic()
        if job.prepared is not None:
            try:
                transfer = job.transport.start(job.prepared, dst, self.pool)
            except TransferError as exc:
                job.error = str(exc)
                if job.prepared.close is not None:
                    job.prepared.close()
        self.connector.add(job, transfer, len(dst), started)

    def transfers_pending(self) -> bool:
        """KV pulls, tier copies or disk I/O in flight, or released blocks not yet offloaded."""
        t = self.tiers
        return self.connector.pending or (t is not None and (t.busy or bool(self.blocks.released)))

    def poll_transfers(self) -> bool:
        """Copy released blocks down to the lower tiers, advance the KV pulls and tier copies in
        flight and settle the requests whose pull or load ended; True while anything remains."""
        if self.tiers is not None:
            self.tiers.step()
        if not self.connector.pending:
            return self.transfers_pending()
        now = time.monotonic()
        for a, err in self.connector.poll(now):
            if isinstance(a.job, TierLoadJob):
                self.arrivals.settle_load(a.job, a.transfer, err)
                continue
            job, rid = a.job, a.job.request_id
            name, secs = job.transport.name, now - a.started
            if err is None:
                seq = self.remote.get(rid)
                if self.audit is not None and seq is not None:
                    self.audit.expect(rid, self.blocks.block_table(rid), seq.num_prompt_tokens, job.first_block,
                                      job.expect_checksums)
                self.arrivals.landed(rid)
                report = PullReport(PullOutcome.PULLED, name, a.transfer.nbytes if a.transfer else 0, a.blocks, secs,
                                    a.transfer.device_seconds() if a.transfer else None)
            else:
                log.warning("KV pull of %s via %s failed: %s (policy: %s)", rid, name, err, job.policy)
                if job.policy == "recompute" and self.arrivals.recompute(rid):
                    report = PullReport(PullOutcome.RECOMPUTED, name, seconds=secs, error=err)
                else:
                    self.abort(rid)
                    report = PullReport(PullOutcome.FAILED, name, seconds=secs, error=err)
            job.on_outcome(report)
        return self.transfers_pending()

    def abort(self, request_id: str) -> bool:
        """Drop the request wherever it is and free its blocks at once (blocks that its stopped
        KV transfer may still write go to the connector's quarantine instead)."""
        pulling = self.connector.abort(request_id)
        if pulling is not None and isinstance(pulling.job, PullJob):
            pulling.job.on_outcome(PullReport(PullOutcome.FAILED, pulling.job.transport.name, error="aborted", aborted=True))
        seq = self.scheduler.remove(request_id) or self.remote.pop(request_id, None) or self.held.pop(request_id, None)
        had_blocks = self.blocks.has_request(request_id)
        self._free(request_id)
        if seq is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
            seq.grammar = None  # the matcher goes now, even while a launched step still names the sequence
        return seq is not None or had_blocks

    def _free(self, request_id: str) -> None:
        """Free a request's blocks now, or when the step in flight (which may write them) is collected."""
        if self._inflight is not None:
            self._deferred_frees.append((self._inflight, request_id))
        else:
            self._free_now(request_id)

    def _free_now(self, request_id: str) -> None:
        if self.audit is not None:
            self.audit.verify(request_id)
        self.blocks.free(request_id)

    def release(self, request_id: str) -> bool:
        """Prefill side: the decode worker has the KV (or gave up): free the held blocks."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self._free_now(request_id)
        return True

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [vocab] (float32) after ``token_ids``, computed in one pass through the paged
        cache (blocks borrowed and returned at once; the prefix cache is neither read nor fed)."""
        with on_device(self.device):
            return self._score(token_ids)

    def _score(self, token_ids: list[int]) -> torch.Tensor:
        from pdmesh.engine.scheduler import ScheduledBatch

        rid = f"__score-{self.num_steps}-{id(token_ids)}"
        if self.blocks.allocate(rid, len(token_ids)) is None:
            raise RequestRejected("not enough free KV blocks to score this sequence now")
        try:
            seq = Sequence(rid, list(token_ids), len(token_ids), SamplingParams(), self.eos_token_ids)
            logits, _ = self.runner.forward(ScheduledBatch([seq], [len(token_ids)]))
            assert logits is not None  # the step computed all of seq's tokens
            return logits[0]
        finally:
            self.blocks.free(rid)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """(poll KV pulls) schedule -> run -> postprocess; with async scheduling, in steady
        decoding: schedule and launch step N+1, then collect step N and return its outputs."""
        with on_device(self.device):
            self.poll_transfers()
            return self._step()

    def _step(self) -> list[RequestOutput]:
        prev = self._inflight
        if prev is not None:
            if not self._can_launch_behind():
                return self._collect(prev)
            batch = self.scheduler.schedule()
            nxt = self.runner.launch_forward(batch, prev) if batch.seqs else None
            self.num_steps_launched_behind += nxt is not None
            self._inflight = nxt  # frees that collecting prev asks for wait for nxt too
            masked = nxt is not None and self._constrained(nxt.sample_seqs)
            if nxt is not None and not masked:
                self.runner.launch_sample(nxt)
            outputs = self._collect(prev)  # advances the grammars by prev's tokens
            if nxt is not None:
                if masked:  # nxt's mask needs prev's tokens; its forward runs meanwhile
                    self.runner.launch_sample(nxt, self._mask)
                self._launched(nxt)
            return outputs
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        decoding = sum(1 for seq in batch.seqs if seq.num_computed_tokens >= seq.num_tokens - 1)
        self.last_step_kind = "decode" if decoding == len(batch.seqs) else "prefill" if decoding == 0 else "mixed"
        started = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = started
        mask = self._mask if self._constrained(batch.seqs) else None
        if (self.async_scheduling and not batch.preempted and decoding == len(batch.seqs) and all(map(_launchable, batch.seqs))
                and not any(s.spec_token_ids for s in batch.seqs)):
            self._inflight = self.runner.launch(batch, mask=mask)
            self._launched(self._inflight)
            return []
        result = self.runner.run(batch, mask)
        return self.postprocess(batch, result)

    def _can_launch_behind(self) -> bool:
        """Whether the next step may be scheduled and launched before the step in flight is
        collected: it would be decode-only, preempt no one, and every sequence outlives the
        in-flight step's token."""
        running = self.scheduler.running
        if self.scheduler.waiting or not running or len(running) > self.blocks.num_free_blocks:
            return False
        if self.spec is not None and any(map(may_propose, running)):  # a proposal needs the last token
            return False
        cfg = self.config.scheduler
        if len(running) > min(cfg.max_num_seqs, cfg.max_num_batched_tokens):
            return False
        limit = self.max_model_len
        for s in running:
            n = len(s.token_ids)
            if n - s.num_computed_tokens != 1 or n >= limit or n - s.num_prompt_tokens >= s.params.max_tokens or not _launchable(s):
                return False
        return True

    def _launched(self, step: LaunchedStep) -> None:
        """The step's tokens count as computed; its sampled tokens are placeholders until collected."""
        for seq in step.batch.seqs:
            if seq.status is SequenceStatus.RUNNING:
                seq.num_computed_tokens += 1
        for row, seq in enumerate(step.sample_seqs):
            if seq.status is SequenceStatus.RUNNING:
                seq.token_ids.append(placeholder(row))

    def _collect(self, step: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens, put them in place of its placeholders, emit them;
        free the blocks that waited for this step."""
        if self._inflight is step:
            self._inflight = None
        result = self.runner.collect(step)
        self.num_steps += 1
        self.last_step_kind = "decode"
        now = time.monotonic()
        outputs = []
        for seq, tok in zip(result.sampled_seqs, result.token_ids):
            if seq.status is not SequenceStatus.RUNNING:  # aborted or finished meanwhile: dropped
                continue
            seq.token_ids[-1] = tok
            self.blocks.cache_full_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)
            outputs.append(self._emit(seq, tok, None, now))
        due = [rid for s, rid in self._deferred_frees if s is step]
        self._deferred_frees = [(s, rid) for s, rid in self._deferred_frees if s is not step]
        for rid in due:
            self._free_now(rid)
        return outputs

    def postprocess(self, batch, result) -> list[RequestOutput]:
        self.num_steps += 1
        now = time.monotonic()
        for seq, lps in result.prompt_logprobs:
            seq.prompt_logprobs.extend(lps)
        rows = {id(s): i for i, s in enumerate(result.sampled_seqs)}
        outputs = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            i = rows.get(id(seq))
            if i is None:  # a prompt chunk that samples nothing yet
                self._computed(seq, seq.num_computed_tokens + n)
            elif result.targets is None:
                outputs.append(self._advance(seq, n, [result.token_ids[i]], [result.logprobs[i]], now))
            else:  # a verify step (speculative decoding)
                outputs.append(self._advance(seq, n, result.targets[i], result.target_logprobs[i], now))
        return outputs

    def _computed(self, seq: Sequence, num_computed: int) -> None:
        """The sequence's KV now covers ``num_computed`` tokens: cache its full blocks (and audit)."""
        seq.num_computed_tokens = num_computed
        self.blocks.cache_full_blocks(seq.request_id, seq.token_ids, num_computed)
        if self.audit is not None and num_computed >= seq.num_prompt_tokens:
            self.audit.record(seq.request_id, self.blocks.block_table(seq.request_id), seq.num_prompt_tokens)

    def _advance(self, seq: Sequence, n: int, targets: list[int], lps: list[Optional[TokenLogprob]],
                 now: float) -> RequestOutput:
        """``seq`` computed ``n`` more tokens and sampled ``targets`` (one per row: 1 + its drafts).
        It gets the accepted drafts plus one token (``spec_decode``; fewer if one of them ends it),
        its KV counts as computed through the last accepted draft, and blocks holding only rejected
        drafts' KV are freed at once.  Without drafts: its one sampled token."""
        drafts = len(seq.spec_token_ids)
        emit = self.spec.accept(seq, targets) if self.spec is not None else 1
        i, tok = 0, targets[0]
        for i, tok in enumerate(targets[:emit]):
            seq.token_ids.append(tok)
            if i + 1 < emit and self._finish_reason(seq, tok) is not None:
                break
        self._computed(seq, min(seq.num_computed_tokens + n - len(targets) + emit, seq.num_tokens))
        if drafts:
            self.blocks.trim(seq.request_id, seq.num_computed_tokens)
        out = self._emit(seq, tok, lps[i], now)
        if i:
            out.new_token_ids = targets[:i + 1]
            out.logprobs = [lp for lp in lps[:i + 1] if lp is not None] if lps[i] is not None else None
        return out

    def _emit(self, seq: Sequence, tok: int, lp: Optional[TokenLogprob], now: float) -> RequestOutput:
        """The output for ``seq``'s newest token ``tok``; finishes or holds the sequence as due."""
        if seq.grammar is not None and not seq.grammar.accept(tok):  # the mask allowed it: a bug
            log.error("request %s: sampled token %d is outside its grammar; ending it", seq.request_id, tok)
            reason: Optional[str] = "abort"
        else:
            reason = self._finish_reason(seq, tok)
        first = seq.num_output_tokens == 1
        assert seq.first_scheduled_time is not None  # a sequence with a token was scheduled
        out = RequestOutput(
            seq.request_id, [tok], reason is not None, reason, [lp] if lp is not None else None,
            seq.num_prompt_tokens, seq.num_cached_tokens,
            queue_time=seq.first_scheduled_time - seq.arrival_time,
            prompt_logprobs=list(seq.prompt_logprobs) if first and seq.params.prompt_logprobs is not None else None,
            prefill_time=now - seq.first_scheduled_time if first else None,
        )
        if reason is not None:
            self._finish(seq, reason)
        elif seq.prefill_only:
            out.finished = True
            out.held_block_ids = list(self.blocks.block_table(seq.request_id))
            if self.audit is not None:
                out.held_block_checksums = self.audit.record(seq.request_id, out.held_block_ids, seq.num_prompt_tokens)
            self.scheduler.remove(seq.request_id)
            seq.status = SequenceStatus.HELD
            seq.grammar = None  # the decode worker replays token 0 into its own matcher
            self.held[seq.request_id] = seq
        return out

    def _finish_reason(self, seq: Sequence, tok: int) -> Optional[str]:
        p = seq.params
        n = len(seq.token_ids)
        generated = n - seq.num_prompt_tokens
        if seq.grammar is not None and seq.grammar.terminated:  # the grammar ended (it accepted EOS)
            return "stop"
        if generated > p.min_tokens:  # EOS/stop ids are masked before that
            if (not p.ignore_eos and tok in seq.eos_token_ids) or tok in p.stop_token_ids:
                return "stop"
        if generated >= p.max_tokens or n >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq.request_id)
        self._free(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.grammar = None

    # ------------------------------------------------------------------ introspection
    def stats(self) -> EngineStats:
        held = sum(len(self.blocks.block_table(r)) for r in self.held if self.blocks.has_request(r))
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_waiting_for_kv=len(self.remote),
            num_held=len(self.held),
            free_blocks=self.blocks.num_free_blocks,
            total_blocks=self.blocks.num_blocks,
            held_blocks=held,
            prefix_queries=self.blocks.prefix_queries,
            prefix_hits=self.blocks.prefix_hits,
            audit_mismatches=self.audit.mismatches if self.audit is not None else 0,
            transfers_stopping=len(self.connector.stopping),
            quarantined_blocks=self.connector.quarantined_blocks(),
            spec=self.spec.stats.copy() if self.spec is not None else None,
            tiers=self.tiers.snapshot() if self.tiers is not None else None,
        )
