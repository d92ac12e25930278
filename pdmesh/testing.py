"""Helpers shared by GPU tests and benchmarks: small random models, the cross-process
prefill -> cuda_ipc -> decode handoff (the library's real parts, driven without the services), and
a synthetic byte-level tokenizer for grammars on dummy models (no model hub on the GPU machine)."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from typing import Optional

from pdmesh.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig


def engine_config(model: str, device: str = "cuda", dtype: str = "bfloat16", backend: str = "auto", eager: bool = False,
                  num_kv_blocks: Optional[int] = None, max_num_seqs: int = 16, max_tokens_step: int = 4096,
                  max_model_len: Optional[int] = 8192, block_size: int = 32, gpu_util: float = 0.9,
                  fused: bool = True, async_scheduling: str = "auto", decode_attention: str = "auto",
                  tokenizer: Optional[str] = None) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=model, load_format="dummy", dtype=dtype, max_model_len=max_model_len, tokenizer=tokenizer),
        cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, gpu_memory_utilization=gpu_util),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens_step,
                                  async_scheduling=async_scheduling),
        device=DeviceConfig(device=device, attention_backend=backend, enforce_eager=eager, fused_kernels=fused,
                            decode_attention=decode_attention),
    )


def _prefill_proc(cfg: EngineConfig, prompt: list[int], params, conn) -> None:
    """Child: prefill ``prompt``, hold its KV, export the pool's IPC handle, wait for 'release'."""
    from pdmesh.engine.engine import LLMEngine
    from pdmesh.rpc.convert import layout_to_proto
    from pdmesh.transport.cuda_ipc import export_handle

    eng = LLMEngine(cfg)
    eng.add_request("r", prompt, params, prefill_only=True)
    out = None
    while out is None:
        outs = eng.step()
        out = outs[0] if outs else None
    h = export_handle(eng.pool, "child")
    conn.send((out.new_token_ids[0], out.held_block_ids, h.SerializeToString(),
               layout_to_proto(eng.pool.layout).SerializeToString()))
    assert conn.recv() == "release"
    eng.release("r")
    conn.send(eng.blocks.num_free_blocks == eng.blocks.num_blocks)
    conn.recv()


def handoff_via_cuda_ipc(prefill_cfg: EngineConfig, decode_cfg: EngineConfig, prompt: list[int], params) -> dict:
    """Prefill in a child process, decode here, KV through cuda_ipc; returns tokens and timings."""
    import time

    import torch

    from pdmesh.engine.engine import LLMEngine
    from pdmesh.transport.cuda_ipc import CudaIpcTransport, open_handle
    from pdmesh.v1 import kv_transfer_pb2 as kpb

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_proc, args=(prefill_cfg, prompt, params, child))
    proc.start()
    try:
        first, src_ids, handle_bytes, _layout = parent.recv()
        dec = LLMEngine(decode_cfg)
        h = kpb.CudaIpcHandle.FromString(handle_bytes)
        t0 = time.perf_counter()
        remote = open_handle(h)
        open_ms = (time.perf_counter() - t0) * 1e3
        adm = dec.admit_remote("r", prompt, first, params)
        k = adm.num_cached_blocks
        tr = CudaIpcTransport(None, dec.device)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        nbytes = tr.pull_blocking(remote, src_ids[k:], adm.block_ids[k:], dec.pool)
        pull_ms = (time.perf_counter() - t0) * 1e3
        parent.send("release")
        prefill_freed = parent.recv()
        dec.activate_remote("r")
        tokens = [first]
        while True:
            outs = dec.step()
            if outs:
                tokens += outs[0].new_token_ids
                if outs[0].finished:
                    break
        torch.cuda.synchronize()
        return {"tokens": tokens, "open_ms": open_ms, "pull_ms": pull_ms, "bytes": nbytes, "prefill_freed": prefill_freed,
                "decode_free_ok": dec.blocks.num_free_blocks == dec.blocks.num_blocks}
    finally:
        parent.send("bye")
        proc.join(60)
        if proc.is_alive():
            proc.kill()


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
        tok = next(candidates, None) or gen()
        if tok not in vocab:
            vocab[tok] = next_id
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
