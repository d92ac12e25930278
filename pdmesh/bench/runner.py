"""Drive a workload against an OpenAI-compatible endpoint: Poisson (gamma, with burstiness)
arrivals at ``request_rate`` or as fast as ``max_concurrency`` allows, streaming every request and
timing each chunk (TTFT, ITL, E2EL as in vLLM's serving benchmark)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Sequence

import httpx

from pdmesh.bench.datasets import BenchRequest
from pdmesh.bench.metrics import RequestResult


@dataclass(frozen=True)
class Target:
    base_url: str
    """e.g. http://127.0.0.1:8000 (the /v1 routes are appended)."""
    model: Optional[str] = None
    endpoint: str = "completions"
    """'completions' (token-id prompts: exact lengths) or 'chat' (text prompts)."""
    api_key: Optional[str] = None
    timeout: float = 6 * 3600.0


def payload(t: Target, req: BenchRequest) -> dict:
    body: dict = {"max_tokens": req.output_len, "temperature": 0, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}}
    if t.model:
        body["model"] = t.model
    if t.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt_text}]
    else:
        body["prompt"] = req.prompt_ids
    return body


async def send(client: httpx.AsyncClient, t: Target, req: BenchRequest) -> RequestResult:
    """One streamed request; output tokens from the final usage chunk (else one per content chunk)."""
    res = RequestResult(success=False, prompt_len=req.prompt_len)
    path = "/v1/chat/completions" if t.endpoint == "chat" else "/v1/completions"
    st = time.perf_counter()
    last = st
    chunks = 0
    try:
        async with client.stream("POST", t.base_url.rstrip("/") + path, json=payload(t, req)) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    res.error = str(obj["error"].get("message", obj["error"]))
                    return res
                if obj.get("usage"):
                    res.output_len = int(obj["usage"].get("completion_tokens", 0))
                ch = obj.get("choices") or []
                if not ch:
                    continue
                c0 = ch[0]
                text = c0.get("text") if "text" in c0 else (c0.get("delta") or {}).get("content")
                if not text and not c0.get("finish_reason"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft = now - st
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
        res.latency = last - st
        res.output_len = res.output_len or chunks
        res.success = chunks > 0
        if not res.success:
            res.error = "no tokens in the stream"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def arrivals(n: int, rate: float, burstiness: float, rng: random.Random) -> AsyncIterator[int]:
    """Yield 0..n-1 with gamma-distributed gaps (shape ``burstiness``, mean 1/rate); rate inf: at once."""
    if burstiness <= 0:
        raise ValueError("--burstiness must be > 0")
    for i in range(n):
        yield i
        if rate != float("inf") and i < n - 1:
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


async def run_load(t: Target, reqs: Sequence[BenchRequest], request_rate: float = float("inf"),
                   max_concurrency: Optional[int] = None, burstiness: float = 1.0, seed: int = 0,
                   on_done: Optional[Callable[[RequestResult], None]] = None) -> tuple[list[RequestResult], float]:
    """Send every request; returns results (in dataset order) and the wall-clock duration."""
    headers = {"Authorization": f"Bearer {t.api_key}"} if t.api_key else {}
    limit = max_concurrency or len(reqs) or 1
    sem = asyncio.Semaphore(limit)
    results: list[Optional[RequestResult]] = [None] * len(reqs)
    async with httpx.AsyncClient(timeout=httpx.Timeout(t.timeout, connect=30.0), headers=headers,
                                 limits=httpx.Limits(max_connections=limit + 8, max_keepalive_connections=limit + 8)) as client:
        async def one(i: int) -> None:
            async with sem:
                results[i] = r = await send(client, t, reqs[i])
            if on_done is not None:
                on_done(r)

        t0 = time.perf_counter()
        tasks = []
        async for i in arrivals(len(reqs), request_rate, burstiness, random.Random(seed)):
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return [r for r in results if r is not None], duration
