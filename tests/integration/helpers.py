"""Helpers shared by the engine tests."""

from __future__ import annotations

import asyncio

from pdmesh.engine import LLMEngine, SamplingParams
from pdmesh.transport.loopback import LoopbackTransport
from pdmesh.v1 import common_pb2 as pb

PROMPTS = [[5, 17, 42, 7, 99, 3], [1, 2, 3], list(range(10, 80)), [200, 201, 5, 5, 5, 9, 250, 31, 8, 8, 8]]
"""Token-id prompts of assorted lengths (the tiny model's vocabulary is 256)."""


def assert_same_logprobs(got: list, want: list, tol: float = 1e-4) -> None:
    """Two runs' ``GenerationResult``s: the same tokens, the same top alternatives, logprobs (and
    prompt logprobs, when asked for) within ``tol``."""
    for a, b in zip(got, want, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert [t for t, _ in x.top] == [t for t, _ in y.top] and abs(x.logprob - y.logprob) < tol
        if b.prompt_logprobs:
            assert [p.token_id for p in a.prompt_logprobs] == [p.token_id for p in b.prompt_logprobs]
            assert max(abs(p.logprob - q.logprob) for p, q in zip(a.prompt_logprobs, b.prompt_logprobs)) < tol


def run_disaggregated(prefill: LLMEngine, decode: LLMEngine, rid: str, prompt: list[int], params: SamplingParams
                      ) -> list[int]:
    """One request split as the mesh splits it: ``prefill`` computes the prompt and token 0 and
    holds the KV; ``decode`` takes it through the servers' hand-off path (``KVHandoff`` + the
    engine's connector, over the in-process loopback transport) and generates the rest."""
    from pdmesh.engine.async_engine import AsyncEngine
    from pdmesh.testing import decode_from, prefill_held
    from pdmesh.transport.handoff import KVHandoff

    async def go() -> list[int]:
        pre, dec = AsyncEngine(lambda: prefill), AsyncEngine(lambda: decode)
        await pre.start()
        await dec.start()
        try:
            first, desc = await prefill_held(pre, rid, prompt, params, worker_id="p", transport="loopback")
            if desc is None:
                return [first]
            assert prefill.blocks.has_request(rid) and rid in prefill.held
            handoff = KVHandoff(dec, {"loopback": LoopbackTransport({"p": prefill.pool})},
                                lambda d, read_id, tp: pre.call_nowait(lambda e: e.release(d.request_id)), timeout=5)
            toks, res = await decode_from(handoff, rid, prompt, first, params, desc)
            assert res.report.outcome.value == "pulled" and res.stats().outcome == pb.TRANSFER_PULLED
            await pre.call(lambda e: None)  # the release queued on prefill has run
            assert rid not in prefill.held
            return toks
        finally:
            await pre.shutdown()
            await dec.shutdown()

    return asyncio.run(go())
