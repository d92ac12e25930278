"""Helpers shared by tests and benchmarks: small random models, the prefill -> decode hand-off
driven without the services but through the library's one hand-off path (``KVHandoff``), and a
synthetic byte-level tokenizer for grammars on dummy models (no model hub on the GPU machine)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pdmesh.config import (AsyncScheduling, AttentionBackendName, CacheConfig, DecodeAttention, DeviceConfig, Dtype, EngineConfig,
                           KVCacheDtype, LoadFormat, ModelConfig, Quantization, SchedulerConfig, TPAllReduce)

if TYPE_CHECKING:
    from pdmesh.transport.handoff import HandoffResult


def engine_config(model: str, device: str = "cuda", dtype: Dtype = "bfloat16", backend: AttentionBackendName = "auto", eager: bool = False,
                  num_kv_blocks: Optional[int] = None, max_num_seqs: int = 16, max_tokens_step: int = 4096,
                  max_model_len: Optional[int] = 8192, block_size: int = 32, gpu_util: float = 0.9,
                  fused: bool = True, async_scheduling: AsyncScheduling = "auto", decode_attention: DecodeAttention = "auto",
                  tokenizer: Optional[str] = None, tensor_parallel_size: int = 1, tp_all_reduce: TPAllReduce = "auto",
                  enable_expert_parallel: bool = False, quantization: Optional[Quantization] = None,
                  kv_cache_dtype: KVCacheDtype = "auto", load_format: LoadFormat = "dummy") -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=model, load_format=load_format, dtype=dtype, max_model_len=max_model_len, tokenizer=tokenizer,
                          quantization=quantization),
        cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, gpu_memory_utilization=gpu_util,
                          kv_cache_dtype=kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens_step,
                                  async_scheduling=async_scheduling),
        device=DeviceConfig(device=device, attention_backend=backend, enforce_eager=eager, fused_kernels=fused,
                            decode_attention=decode_attention, tensor_parallel_size=tensor_parallel_size,
                            tp_all_reduce=tp_all_reduce, enable_expert_parallel=enable_expert_parallel),
    )


async def prefill_held(prefill, rid: str, prompt: list[int], params, **desc_fields):
    """Prefill ``prompt`` on the ``AsyncEngine`` ``prefill``: (first token, descriptor of the held
    KV or None when the request ended at its first token).  ``desc_fields``: worker_id, address,
    transport, incarnation, ... of the descriptor."""
    from pdmesh.rpc.convert import layout_to_proto
    from pdmesh.v1 import common_pb2 as pb

    out = None
    async for out in prefill.generate(rid, prompt, params, prefill_only=True):  # noqa: B007 - the last output is kept
        pass
    assert out is not None  # generate yields at least the first token
    if out.held_block_ids is None:
        return out.new_token_ids[0], None
    return out.new_token_ids[0], pb.KVDescriptor(
        request_id=rid, block_ids=out.held_block_ids, num_tokens=len(prompt), block_checksums=out.held_block_checksums or [],
        layout=layout_to_proto(prefill.engine.pool.layout), **desc_fields)


async def decode_from(handoff, rid: str, prompt: list[int], first: int, params, desc) -> tuple[list[int], HandoffResult]:
    """Take ``desc`` through ``handoff`` (a ``KVHandoff``) and decode to the end: (tokens with the
    first, the ``HandoffResult``).  Raises RuntimeError when the pull failed."""
    from pdmesh.engine.connector import PullOutcome

    eng = handoff.engine
    q = eng.open_stream(rid)
    res = await handoff.take(rid, prompt, first, params, desc)
    if res.report.outcome is PullOutcome.FAILED:
        eng.close_stream(rid)
        raise RuntimeError(f"KV pull failed: {res.report.error}")
    tokens = [first]
    async for out in eng.iterate(rid, q):
        tokens += out.new_token_ids
    return tokens, res


def _prefill_proc(cfg: EngineConfig, prompt: list[int], params, conn) -> None:
    """Child: prefill ``prompt`` and hold its KV under a lease, serving ``KVTransfer`` (IPC handle,
    read pins) until the reader ends its read; report whether every block came back."""
    asyncio.run(_prefill_main(cfg, prompt, params, conn))


async def _prefill_main(cfg: EngineConfig, prompt: list[int], params, conn) -> None:
    import grpc

    from pdmesh.engine.async_engine import AsyncEngine
    from pdmesh.engine.engine import LLMEngine
    from pdmesh.transport.capability import prompt_hash
    from pdmesh.transport.lease import LeaseTable
    from pdmesh.transport.servicer import KVTransferServicer
    from pdmesh.v1 import kv_transfer_pb2_grpc as kgrpc

    eng = AsyncEngine(lambda: LLMEngine(cfg))
    await eng.start()
    assert eng.engine is not None  # built by start()
    leases = LeaseTable(lambda rid: eng.call_nowait(lambda e: e.release(rid)), ttl=120)
    server = grpc.aio.server()
    kgrpc.add_KVTransferServicer_to_server(KVTransferServicer(eng.engine.pool, leases, "child"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        first, desc = await prefill_held(eng, "r", prompt, params, worker_id="child", address=f"127.0.0.1:{port}",
                                         transport="cuda_ipc", incarnation="child")
        lease = leases.add("r", list(desc.block_ids), len(prompt), prompt_hash=prompt_hash(prompt))
        desc.lease_token, desc.prompt_hash = lease.token, lease.prompt_hash  # the reader's capability
        conn.send((first, desc.SerializeToString()))
        while leases.get("r") is not None:  # until EndRead
            await asyncio.sleep(0.01)
        stats = await eng.call(lambda e: e.stats())  # after the release the lease queued
        conn.send(stats.free_blocks == stats.total_blocks)
        await asyncio.to_thread(conn.recv)
    finally:
        await server.stop(0)
        await eng.shutdown()


def handoff_via_cuda_ipc(prefill_cfg: EngineConfig, decode_cfg: EngineConfig, prompt: list[int], params) -> dict:
    """Prefill in a child process, decode here, KV through the ``cuda_ipc`` transport and the
    engine's connector (the servers' hand-off path); returns tokens and what the pull cost."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_proc, args=(prefill_cfg, prompt, params, child))
    proc.start()
    try:
        first, desc_bytes = parent.recv()
        return asyncio.run(_decode_main(decode_cfg, prompt, params, first, desc_bytes, parent))
    finally:
        parent.send("bye")
        proc.join(60)
        if proc.is_alive():
            proc.kill()


async def _decode_main(cfg: EngineConfig, prompt: list[int], params, first: int, desc_bytes: bytes, conn) -> dict:
    import time

    from pdmesh.engine.async_engine import AsyncEngine
    from pdmesh.engine.engine import LLMEngine
    from pdmesh.rpc.channels import ChannelPool
    from pdmesh.rpc.release import release_held_kv
    from pdmesh.transport.cuda_ipc import CudaIpcTransport
    from pdmesh.transport.handoff import KVHandoff
    from pdmesh.v1 import common_pb2 as pb

    dec = AsyncEngine(lambda: LLMEngine(cfg))
    await dec.start()
    assert dec.engine is not None  # built by start()
    channels = ChannelPool()
    try:
        tr = CudaIpcTransport(channels, dec.engine.device)
        handoff = KVHandoff(dec, {"cuda_ipc": tr}, lambda d, read_id, tp: release_held_kv(
            channels, d.address, d.request_id, tp, 10.0, read_id=read_id, lease_token=d.lease_token), timeout=60.0)
        t0 = time.perf_counter()
        tokens, res = await decode_from(handoff, "r", prompt, first, params, pb.KVDescriptor.FromString(desc_bytes))
        total_ms = (time.perf_counter() - t0) * 1e3
        prefill_freed = await asyncio.to_thread(conn.recv)
        stats = await dec.call(lambda e: e.stats())
        return {"tokens": tokens, "pull_ms": res.report.seconds * 1e3, "handoff_and_decode_ms": total_ms,
                "bytes": res.report.bytes, "outcome": res.report.outcome.value, "handles_opened": tr.opened_total,
                "prefill_freed": prefill_freed, "decode_free_ok": stats.free_blocks == stats.total_blocks}
    finally:
        await channels.close()
        await dec.shutdown()


def write_byte_level(vocab_size: int, out: Path, special_ids: tuple[int, ...] = ()) -> Path:
    """A byte-level BPE vocabulary of ``vocab_size`` tokens shaped like a real LLM's (the 256 byte
    symbols, then deterministic pseudo-words of 1-12 letters, half with a leading space, plus digits
    and JSON punctuation runs), with ``special_ids`` as special tokens: for measuring grammar masks,
    whose cost depends on the vocabulary's size and shape, where no real tokenizer is at hand.
    Encoding is byte by byte (no merges); only the vocabulary matters for a mask."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(0)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = {i: f"<|special_{i}|>" for i in special_ids}
    vocab: dict[str, int] = {}
    pieces = ["{", "}", "[", "]", '"', ":", ",", '{"', '":', '",', '"}', '":"', '","', ', "', '": ', "},", "],", "Ġ{",
              "Ġ\"", "Ġ[", "null", "true", "false"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    candidates = iter(alphabet + pieces)
    next_id = 0

    def gen() -> str:
        kind = rng.random()
        if kind < 0.05:
            return ("Ġ" if rng.random() < 0.5 else "") + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
        word = "".join(rng.choice(letters) for _ in range(min(12, max(1, int(rng.expovariate(0.25)) + 1))))
        word = word.capitalize() if rng.random() < 0.15 else word
        return ("Ġ" if rng.random() < 0.5 else "") + word

    while next_id < vocab_size:
        if next_id in specials:
            vocab[specials[next_id]] = next_id
            next_id += 1
            continue
        piece = next(candidates, None) or gen()
        if piece not in vocab:
            vocab[piece] = next_id
            next_id += 1
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials.values()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    eos = specials[special_ids[0]] if special_ids else None
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": 1 << 20}))
    return out
