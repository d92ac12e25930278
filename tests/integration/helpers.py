"""Helpers shared by the engine tests."""

from __future__ import annotations

import asyncio

from pdmesh.engine import LLMEngine, SamplingParams
from pdmesh.rpc.convert import layout_to_proto
from pdmesh.transport.loopback import LoopbackTransport
from pdmesh.v1 import common_pb2 as pb

PROMPTS = [[5, 17, 42, 7, 99, 3], [1, 2, 3], list(range(10, 80)), [200, 201, 5, 5, 5, 9, 250, 31, 8, 8, 8]]
"""Token-id prompts of assorted lengths (the tiny model's vocabulary is 256)."""


def run_disaggregated(prefill: LLMEngine, decode: LLMEngine, rid: str, prompt: list[int], params: SamplingParams
                      ) -> list[int]:
    """One request split as the mesh splits it: ``prefill`` computes the prompt and token 0 and
    holds the KV, ``decode`` admits it, pulls the blocks (loopback transport), and generates the rest."""
    prefill.add_request(rid, prompt, params, prefill_only=True)
    out = None
    while out is None:
        outs = [o for o in prefill.step() if o.request_id == rid]
        out = outs[0] if outs else None
    tokens_ = list(out.new_token_ids)
    if out.finish_reason is not None:
        return tokens_
    assert prefill.blocks.has_request(rid) and rid in prefill.held
    adm = decode.admit_remote(rid, prompt, tokens_[0], params)
    desc = pb.KVDescriptor(request_id=rid, worker_id="p", block_ids=out.held_block_ids, num_tokens=len(prompt),
                           layout=layout_to_proto(prefill.pool.layout))
    k = adm.num_cached_blocks
    asyncio.run(LoopbackTransport({"p": prefill.pool}).pull(desc, out.held_block_ids[k:], adm.block_ids[k:], decode.pool, 5))
    assert prefill.release(rid)
    assert decode.activate_remote(rid)
    while True:
        for o in decode.step():
            tokens_ += o.new_token_ids
            if o.finished:
                return tokens_
