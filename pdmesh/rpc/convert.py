"""Conversions between protobuf messages and the library's dataclasses."""

from __future__ import annotations

from pdmesh.engine.grammar import GrammarError, GrammarSpec
from pdmesh.engine.sequence import SamplingParams, TokenLogprob
from pdmesh.kv.pool import KVLayout
from pdmesh.v1 import common_pb2 as pb


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty, max_tokens=p.max_tokens, min_tokens=p.min_tokens,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, logit_bias=dict(p.logit_bias),
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        msg.prompt_logprobs = p.prompt_logprobs
    if p.grammar is not None:
        msg.grammar.CopyFrom(pb.Grammar(kind=p.grammar.kind, value=p.grammar.value))
    return msg


def params_from_proto(m: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError (from SamplingParams or GrammarSpec validation) for bad values."""
    grammar = None
    if m.HasField("grammar"):
        try:
            grammar = GrammarSpec(m.grammar.kind, m.grammar.value)  # type: ignore[arg-type]
        except GrammarError as exc:
            raise ValueError(str(exc)) from None
    return SamplingParams(
        temperature=m.temperature, top_p=m.top_p or 1.0, top_k=m.top_k, min_p=m.min_p,
        seed=m.seed if m.HasField("seed") else None,
        presence_penalty=m.presence_penalty, frequency_penalty=m.frequency_penalty,
        repetition_penalty=m.repetition_penalty or 1.0, max_tokens=m.max_tokens, min_tokens=m.min_tokens,
        stop_token_ids=tuple(m.stop_token_ids), ignore_eos=m.ignore_eos,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
        logit_bias=tuple(sorted(m.logit_bias.items())), grammar=grammar,
        prompt_logprobs=m.prompt_logprobs if m.HasField("prompt_logprobs") else None,
    )


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                           top_token_ids=[t for t, _ in lp.top], top_logprobs=[v for _, v in lp.top])


def logprob_from_proto(m: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(m.token_id, m.logprob, list(zip(m.top_token_ids, m.top_logprobs)), m.rank)


def layout_to_proto(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                       block_size=layout.block_size, dtype=layout.dtype, layout=layout.layout,
                       tensor_parallel_size=layout.tp_size)


def layout_from_proto(m: pb.KVLayout) -> KVLayout:
    return KVLayout(m.num_layers, m.num_kv_heads, m.head_dim, m.block_size, m.dtype, m.layout,
                    tp_size=max(1, m.tensor_parallel_size))
