"""Serving metrics with vLLM's definitions (``vllm bench serve``).

Per request: TTFT = first token's arrival - send time; E2EL = last arrival - send time;
TPOT = (E2EL - TTFT) / (output tokens - 1), only for requests with more than one output token
(the first token is excluded); ITL = every gap between consecutive streamed chunks.  Aggregates
over successful requests: mean, median, standard deviation and percentiles (linear interpolation,
as numpy); throughputs divide by the benchmark's wall-clock duration; goodput counts requests that
meet every SLO given (TTFT, TPOT, E2EL, and ITL: the request's own P99 inter-token latency; in ms).
``request_records`` keeps every request's figures in the result file, so that goodput can be
recomputed later at any SLO.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass
class RequestResult:
    """One request as the client saw it (times in seconds)."""

    success: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> Optional[float]:
        return (self.latency - self.ttft) / (self.output_len - 1) if self.success and self.output_len > 1 else None

    @property
    def p99_itl(self) -> float:
        """This request's 99th-percentile gap between streamed chunks (0 with fewer than two chunks)."""
        return percentile(self.itl, 99)

    def record(self) -> dict:
        """The request's figures for the result file (ms; tpot None with one output token)."""
        tpot = self.tpot
        return {"ok": self.success, "input_tokens": self.prompt_len, "output_tokens": self.output_len,
                "ttft_ms": self.ttft * 1e3, "tpot_ms": tpot * 1e3 if tpot is not None else None,
                "p99_itl_ms": self.p99_itl * 1e3, "max_itl_ms": max(self.itl, default=0.0) * 1e3,
                "e2el_ms": self.latency * 1e3, "error": self.error}


def percentile(values: Sequence[float], p: float) -> float:
    """numpy.percentile(values, p) with linear interpolation (0 for no values)."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(name: str, values: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values]
    out = {f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
           f"median_{name}_ms": percentile(ms, 50),
           f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = percentile(ms, p)
    return out


def parse_goodput(specs: Sequence[str]) -> dict[str, float]:
    """'ttft:200', 'tpot:35', 'e2el:5000', 'itl:40' -> {'ttft': 200.0, ...} (milliseconds; itl: each
    request's own P99 inter-token latency)."""
    out = {}
    for spec in specs:
        key, _, val = spec.partition(":")
        if key not in SLO_KEYS or not val:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS, itl:MS (per-request P99) or e2el:MS; got {spec!r}")
        ms = float(val)
        if ms <= 0:
            raise ValueError(f"--goodput {spec!r}: the limit must be > 0")
        out[key] = ms
    return out


SLO_KEYS = ("ttft", "tpot", "itl", "e2el")


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.success:
        return False
    tpot = r.tpot if r.tpot is not None else 0.0
    got = {"ttft": r.ttft * 1000.0, "tpot": tpot * 1000.0, "itl": r.p99_itl * 1000.0, "e2el": r.latency * 1000.0}
    return all(got[k] <= v for k, v in slo.items())


def summarize(results: Sequence[RequestResult], duration: float, percentiles: Sequence[float] = (99,),
              goodput: Optional[dict[str, float]] = None, num_gpus: int = 0) -> dict[str, float]:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    out: dict[str, float] = {
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    if num_gpus:
        out["output_throughput_per_gpu"] = out["output_throughput"] / num_gpus
    if goodput:
        good = sum(meets_slo(r, goodput) for r in ok)
        out["request_goodput"] = good / duration if duration > 0 else 0.0
    out.update(_stats("ttft", [r.ttft for r in ok], percentiles))
    out.update(_stats("tpot", [r.tpot for r in ok if r.tpot is not None], percentiles))
    out.update(_stats("itl", [x for r in ok for x in r.itl], percentiles))
    out.update(_stats("e2el", [r.latency for r in ok], percentiles))
    return out
