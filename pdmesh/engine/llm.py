"""Offline entry point, in the spirit of vLLM's ``LLM(...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import inspect
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from pdmesh.config import (AsyncScheduling, AttentionBackendName, CacheConfig, DeviceConfig, Dtype, EngineConfig, KVCacheDtype,
                           LoadFormat, ModelConfig, Quantization, SchedulerConfig, parse_speculative_config)
from pdmesh.engine.engine import LLMEngine
from pdmesh.engine.sequence import SamplingParams, TokenLogprob
from pdmesh.tokenizer import StopStringMatcher, Tokenizer


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    logprobs: Optional[list[TokenLogprob]] = None


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    """Logprobs of prompt tokens 1.. when ``SamplingParams.prompt_logprobs`` asked for them."""


def child_seed(seed: Optional[int], index: int) -> Optional[int]:
    """Seed of the ``index``-th of n samples: distinct per sample, reproducible per request."""
    return None if seed is None else seed + index * 1_000_003


class LLM:
    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None, load_format: LoadFormat = "auto",
                 dtype: Dtype = "auto", max_model_len: Optional[int] = None, seed: int = 0, block_size: int = 32,
                 num_kv_blocks: Optional[int] = None, kv_cache_memory: int = 512 << 20,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 128, max_num_batched_tokens: int = 2048,
                 enable_chunked_prefill: bool = True, device: str = "auto", attention_backend: AttentionBackendName = "auto",
                 enforce_eager: bool = False, async_scheduling: AsyncScheduling = "auto", tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, cpu_threads: int = 0, quantization: Optional[Quantization] = None,
                 kv_cache_dtype: KVCacheDtype = "auto", speculative_config: Optional[Union[dict[str, Any], str]] = None,
                 engine_config: Optional[EngineConfig] = None) -> None:
        """``quantization`` ('fp8', 'int8'), ``kv_cache_dtype`` ('fp8'): as ``--quantization`` and
        ``--kv-cache-dtype``.  ``speculative_config``: vLLM's dict (or its JSON), e.g. ``{"method":
        "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}``.
        ``engine_config``: the whole configuration; the other arguments must then stay at their defaults."""
        if engine_config is not None:
            args = {k: v for k, v in locals().items() if k not in ("self", "engine_config")}
            defaults = {n: p.default for n, p in inspect.signature(LLM.__init__).parameters.items()}
            given = sorted(k for k, v in args.items() if v != defaults[k])
            if given:
                raise TypeError(f"LLM(engine_config=...) takes its settings from the config; also given: {', '.join(given)}")
        if engine_config is None:
            mc = ModelConfig(tokenizer=tokenizer, load_format=load_format, dtype=dtype, max_model_len=max_model_len, seed=seed,
                             quantization=quantization, **({"model": model} if model else {}))
            engine_config = EngineConfig(
                model=mc,
                cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory,
                                  enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype),
                scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                          enable_chunked_prefill=enable_chunked_prefill, async_scheduling=async_scheduling),
                device=DeviceConfig(device=device, attention_backend=attention_backend, enforce_eager=enforce_eager,
                                    tensor_parallel_size=tensor_parallel_size, cpu_threads=cpu_threads,
                                    enable_expert_parallel=enable_expert_parallel),
                speculative=parse_speculative_config(json.dumps(speculative_config) if isinstance(speculative_config, dict)
                                                     else speculative_config),
            )
        self.engine = LLMEngine(engine_config)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's other tensor-parallel ranks (nothing to do without TP)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise ValueError(f"{self.engine.resolved.tokenizer_path or 'this model'} has no tokenizer: pass token ids "
                             "with detokenize=False, or tokenizer=...")
        return self.engine.tokenizer

    def generate(self, prompts: Union[str, Sequence[str], Sequence[Sequence[int]]],
                 params: Optional[SamplingParams] = None, detokenize: bool = True) -> list[GenerationResult]:
        """Generate for every prompt (text, or token ids) in one continuous batch."""
        params = params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        token_prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if detokenize or params.stop:
            _ = self.tokenizer
        return self._run(token_prompts, params, detokenize)

    def chat(self, conversations: Sequence[list[dict[str, Any]]], params: Optional[SamplingParams] = None,
             **template_kwargs: Any) -> list[GenerationResult]:
        token_prompts = [self.tokenizer.apply_chat_template(list(c), **template_kwargs) for c in conversations]
        return self._run(token_prompts, params or SamplingParams(), True)

    def _run(self, token_prompts: list[list[int]], params: SamplingParams, detokenize: bool) -> list[GenerationResult]:
        eng = self.engine
        results = [GenerationResult(p) for p in token_prompts]
        live: dict[str, dict[str, Any]] = {}
        for i, prompt in enumerate(token_prompts):
            for j in range(params.n):
                rid = f"llm-{next(self._ids)}"
                sub = params.with_updates(n=1, seed=child_seed(params.seed, j))
                eng.add_request(rid, prompt, sub)
                comp = Completion(j, "", [], None, [] if params.logprobs is not None else None)
                results[i].outputs.append(comp)
                live[rid] = {
                    "res": results[i], "comp": comp,
                    "detok": self.tokenizer.detokenizer(prompt, params.skip_special_tokens) if detokenize else None,
                    "stop": StopStringMatcher(params.stop, params.include_stop_str_in_output),
                }
        while live or eng.has_work():  # then collect a step still in flight (async scheduling)
            for out in eng.step():
                st = live.get(out.request_id)
                if st is None:
                    continue
                comp = st["comp"]  # a Completion, as declared above
                st["res"].num_cached_tokens = out.num_cached_tokens
                if out.prompt_logprobs is not None:
                    st["res"].prompt_logprobs = out.prompt_logprobs
                new, hit = out.new_token_ids, False
                if st["detok"] is not None:  # a step may run past a stop string: cut at the token completing it
                    text, cut = st["stop"].feed_tokens(st["detok"], new)
                    if cut is not None:
                        new, hit = new[:cut], True
                    elif out.finished:
                        rest, hit = st["stop"].feed(st["detok"].flush())
                        text += rest
                    comp.text += text
                comp.token_ids.extend(new)
                if out.logprobs and comp.logprobs is not None:
                    comp.logprobs.extend(out.logprobs[:len(new)])
                if hit:
                    eng.abort(out.request_id)
                    comp.finish_reason = "stop"
                    del live[out.request_id]
                    continue
                if out.finished:
                    if st["detok"] is not None:
                        comp.text += st["stop"].flush()
                    comp.finish_reason = out.finish_reason
                    del live[out.request_id]
        return results
