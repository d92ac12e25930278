"""A small model of prefill:decode layouts: predicted goodput, throughput, TTFT and TPOT of xPyD
(x prefill GPUs, y decode GPUs) and of N colocated replicas (chunked prefill), from measured step
and prefill costs. Pure Python, no pdmesh import: it runs anywhere and is what the scheduler could
run to pick a ratio.

    python benchmarks/pd_layout_model.py --costs costs.json --gpus 4 --shape 3500:1500 \
        --concurrency 64 128 256 --slo tpot:20 --slo tpot:35,itl:40

Costs (``Costs``; ``benchmarks/pd_layout_fit.py`` fits them from workers' metrics or client records)
-------------------------------------------------------------------------------------------------
* decode step of B sequences of mean context L tokens:   T_d(B, L) = a + b*B + g*B*L   [ms]
  (a: weights and launches; g: reading each sequence's KV, the HBM-bound part; b: per sequence)
* prefill GPU time of one prompt of I tokens:             s(I) = p1*I + p2*I^2      [ms]
* o: latency outside the GPUs' steps (gateway, routing, KV pull, first-token streaming), added to TTFT
* phi: a colocated prefill riding on decode steps costs W = phi*s(I) of GPU time, spread over
  n_ch = ceil(I / chunk) mixed steps, each W / n_ch longer than the decode step it rides on
* max_batch: sequences one decode worker runs at once (--max-num-seqs); more wait for a slot.

Workload: I input, O output tokens per request, closed loop at max concurrency C, N requests (how
``pdmesh bench --max-concurrency C --num-prompts N`` runs a point): the first C are sent at t = 0,
each later one when a request ends (the earliest end among those in flight). Context L = I + O/2.

Every request i, in the order sent, by one explicit recursion (no event queue):
* sent at a_i (0, or the earliest client-side end in flight); prefill queue q = i mod (prefill GPUs,
  or replicas), first come first served: start_i = max(a_i, free_q), done_i = free_q = start_i + span_i
  - xPyD: span = s(I)
  - colocated: span = W + n_ch * T_d(b, I): each chunk rides on a decode step of the b sequences the
    replica is decoding at start_i (s(I) when b = 0: a plain prefill)
  - 1P1D on one GPU: span = s(I), doubled while the decode process has sequences (fair time slicing)
* decode on GPU (or replica) g = i mod (decode GPUs, or replicas): it takes a slot at
  begin_i = done_i, or when the earliest of max_batch windows ends, and decodes O-1 tokens over the
  window [begin_i, end_i = begin_i + (O-1)*t_i] with
    t_i = T_d(Bbar_i, L) + W * F_i / (O-1)      TPOT_i = t_i + (begin_i - done_i) / (O-1)
  where Bbar_i = (integral over the window of the number of windows open on g) / window length (the
  mean batch it rode in), and F_i = sum over the prefills j on g of |P_j & window_i| / |P_j| with
  P_j = [start_j, done_j] (the prefill work done during its window; 0 for xPyD).
* TTFT_i = done_i - a_i + o; its client-side end is end_i + o.
* its P99 inter-token latency: xPyD: T_d(the largest batch open during its window); colocated: the
  99th percentile (linear interpolation) of O-1 intervals of which n_ch*F_i are mixed steps of
  T_d(Bbar_i) + W/n_ch and the rest T_d(Bbar_i); shared GPU: the intervals that overlap the other
  process's prefills (F_i*s/T_d of them) take 2*T_d.
The t_i depend on the windows and the windows on the t_i: the recursion is iterated (damped) to a
fixed point. Duration = the last client-side end; throughput = N*O / duration; goodput under an SLO
= requests whose TPOT (and P99 ITL, when the SLO has one) meet it / duration. Busy shares: prefill
GPUs N*s / (x*duration); decode GPUs sum_i (O-1)*T_d(Bbar_i)/Bbar_i / (y*duration) (each request's
share of every step it rode in); colocated ones add N*W.

The long-run state (``steady_state``; many waves) is a two-station balance, solved by bisection:
* xPyD: C_d requests decoding, B = C_d/y per GPU, X = y*B / ((O-1)*T_d(B, L)); the other
  n_p = C - C_d - X*o wait for or run prefill at min(n_p, x)/s(I); TTFT = o + n_p/X, TPOT = T_d(B, L).
* colocated, m = C/N per replica: X = B / ((O-1)*T_d(B, L) + B*W) (a replica's time per output token
  is its step shared by B plus the prefill work per request spread over its tokens);
  B + X*(W + n_ch*T_d(B, I) + o) = m; TPOT = T_d(B, L) + B*W/(O-1).

What it leaves out (so where it is off): CPU-side latency that grows with the requests arriving at
once (gateway, admission: o is one number); prefill cost growing under load (KV pulls read the
prefill GPU's memory: +10-15% measured); routing that is not round robin; the decode step's own
jitter (a disaggregated request's P99 ITL is 1.2-1.5x its TPOT measured, ~1.05x here); KV-capacity
preemption.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class Costs:
    """Measured costs of one model on one GPU type (milliseconds)."""

    alpha_ms: float
    """Decode step: fixed part (weights read, launches)."""
    per_kv_token_ms: float
    """Decode step: per token of context held by the batch (KV read)."""
    prefill_per_token_ms: float
    """Prefill GPU time per prompt token (linear part)."""
    per_seq_ms: float = 0.0
    """Decode step: per sequence in the batch (sampling, per-sequence kernels)."""
    prefill_per_token2_ms: float = 0.0
    """Prefill GPU time per prompt token squared (causal attention)."""
    overhead_ms: float = 0.0
    """Latency a request spends outside the GPUs' steps (gateway, routing, KV pull), added to TTFT."""
    chunk_overhead: float = 1.0
    """Colocated prefill GPU time over a dedicated prefill worker's (chunks re-read earlier KV, ride
    on decode steps)."""
    max_batch: int = 128
    """Sequences one decode (or colocated) worker runs at once."""

    def __post_init__(self) -> None:
        for name in ("alpha_ms", "per_kv_token_ms", "prefill_per_token_ms", "per_seq_ms", "prefill_per_token2_ms", "overhead_ms"):
            if not getattr(self, name) >= 0 or math.isinf(getattr(self, name)):
                raise ValueError(f"Costs.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.alpha_ms + self.per_seq_ms + self.per_kv_token_ms <= 0:
            raise ValueError("Costs: a decode step must cost something (alpha_ms, per_seq_ms or per_kv_token_ms > 0)")
        if self.prefill_per_token_ms + self.prefill_per_token2_ms <= 0:
            raise ValueError("Costs: prefill must cost something (prefill_per_token_ms or prefill_per_token2_ms > 0)")
        if not self.chunk_overhead >= 0.5 or math.isinf(self.chunk_overhead):
            raise ValueError(f"Costs.chunk_overhead must be >= 0.5, got {self.chunk_overhead!r}")
        if self.max_batch < 1:
            raise ValueError(f"Costs.max_batch must be >= 1, got {self.max_batch}")

    def step_ms(self, batch: float, context: float) -> float:
        """T_d(B, L): one decode step of ``batch`` sequences of mean context ``context`` (0 for none)."""
        if batch <= 0:
            return 0.0
        return self.alpha_ms + self.per_seq_ms * batch + self.per_kv_token_ms * batch * context

    def prefill_ms(self, tokens: float) -> float:
        """s(I): GPU time of one prompt of ``tokens`` tokens on a prefill worker."""
        return self.prefill_per_token_ms * tokens + self.prefill_per_token2_ms * tokens * tokens

    @classmethod
    def from_dict(cls, d: dict) -> Costs:
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Costs: unknown fields {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class Layout:
    """Where prefill and decode run on ``gpus`` GPUs."""

    prefill: int = 0
    """Prefill GPUs (disaggregated layouts)."""
    decode: int = 0
    """Decode GPUs (disaggregated layouts)."""
    colocated: int = 0
    """Colocated replicas, one GPU each (0 for a disaggregated layout)."""
    chunk: int = 2048
    """Colocated: prompt tokens per step (--max-num-batched-tokens)."""
    shared_gpu: bool = False
    """1P1D with both workers on one GPU."""

    def __post_init__(self) -> None:
        disagg = self.prefill > 0 and self.decode > 0
        if disagg == (self.colocated > 0) or min(self.prefill, self.decode, self.colocated) < 0:
            raise ValueError(f"Layout: give prefill >= 1 and decode >= 1, or colocated >= 1 (got {self})")
        if self.shared_gpu and (self.prefill, self.decode) != (1, 1):
            raise ValueError("Layout: shared_gpu is for 1P1D only")
        if self.chunk < 1:
            raise ValueError(f"Layout.chunk must be >= 1, got {self.chunk}")

    @property
    def gpus(self) -> int:
        return 1 if self.shared_gpu else self.prefill + self.decode + self.colocated

    @property
    def name(self) -> str:
        if self.colocated:
            return f"{self.colocated}C"
        return f"{self.prefill}P{self.decode}D" + ("-1gpu" if self.shared_gpu else "")

    @classmethod
    def parse(cls, text: str, chunk: int = 2048) -> Layout:
        """'1P3D', '4C' (colocated replicas), '1P1D-1gpu' (both workers on one GPU)."""
        m = re.fullmatch(r"(\d+)P(\d+)D(-1gpu)?|(\d+)C", text.strip())
        if not m:
            raise ValueError(f"layout {text!r}: expected xPyD (e.g. 1P3D), xPyD-1gpu or NC (e.g. 4C)")
        if m.group(4):
            return cls(colocated=int(m.group(4)), chunk=chunk)
        return cls(prefill=int(m.group(1)), decode=int(m.group(2)), shared_gpu=bool(m.group(3)), chunk=chunk)


@dataclass(frozen=True)
class Workload:
    """One load point."""

    input_len: int
    """Prompt tokens per request."""
    output_len: int
    """Output tokens per request (ignore_eos)."""
    concurrency: int
    """Requests in flight at most (closed loop)."""
    num_prompts: int = 0
    """Requests in the point (0: as many as the concurrency, one wave)."""

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 2 or self.concurrency < 1 or self.num_prompts < 0:
            raise ValueError(f"Workload: need input_len >= 1, output_len >= 2, concurrency >= 1 (got {self})")

    @property
    def n(self) -> int:
        return self.num_prompts or self.concurrency


@dataclass(frozen=True)
class SLO:
    """A request is good when it meets every limit given."""

    tpot_ms: float
    """Its TPOT (mean time per output token after the first)."""
    p99_itl_ms: Optional[float] = None
    """Its own 99th-percentile inter-token latency (None: no limit)."""

    @property
    def name(self) -> str:
        return f"TPOT {self.tpot_ms:g}" + (f" + P99 ITL {self.p99_itl_ms:g}" if self.p99_itl_ms is not None else "")

    def met(self, tpot: float, p99_itl: float) -> bool:
        return tpot <= self.tpot_ms and (self.p99_itl_ms is None or p99_itl <= self.p99_itl_ms)

    @classmethod
    def parse(cls, text: str) -> SLO:
        """'tpot:35' or 'tpot:20,itl:40'."""
        parts = dict(p.split(":", 1) for p in text.split(",") if ":" in p)
        if "tpot" not in parts or set(parts) - {"tpot", "itl"}:
            raise ValueError(f"SLO {text!r}: expected tpot:MS[,itl:MS]")
        return cls(float(parts["tpot"]), float(parts["itl"]) if "itl" in parts else None)


SLOS = (SLO(20.0), SLO(35.0), SLO(20.0, 40.0), SLO(35.0, 40.0))
"""The issue's SLOs: TPOT 20 / 35 ms, with and without a P99 ITL of 40 ms."""


@dataclass
class Prediction:
    """What the model says of one layout at one load point."""

    layout: str
    workload: Workload
    ttft_ms: list[float]
    """Every request's TTFT (wave 1 first)."""
    tpot_ms: list[float]
    p99_itl_ms: list[float]
    duration_s: float
    output_throughput: float
    """Output tokens per second."""
    request_throughput: float
    goodput: dict[str, float]
    """Requests per second meeting each SLO (by ``SLO.name``)."""
    busy: dict[str, float]
    """Share of the duration each kind of GPU computes (mean over GPUs of the kind)."""
    steady: dict[str, float] = field(default_factory=dict)
    """The long-run state at this concurrency (``steady_state``): req/s, decode batch per GPU, TTFT, TPOT."""

    def percentile(self, name: str, p: float) -> float:
        return percentile(getattr(self, name), p)

    def summary(self) -> dict:
        return {"layout": self.layout, **asdict(self.workload), "duration_s": self.duration_s,
                "output_throughput": self.output_throughput, "request_throughput": self.request_throughput,
                "ttft_p50_ms": self.percentile("ttft_ms", 50), "ttft_p99_ms": self.percentile("ttft_ms", 99),
                "tpot_p50_ms": self.percentile("tpot_ms", 50), "p99_itl_p50_ms": self.percentile("p99_itl_ms", 50),
                "goodput": self.goodput, "busy": self.busy, "steady": self.steady}


def percentile(values: Sequence[float], p: float) -> float:
    """numpy.percentile with linear interpolation, as ``pdmesh.bench.metrics.percentile`` (what ``pdmesh
    bench`` reports; repeated here so that this module imports nothing of pdmesh); 0 for none."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _p99_of_two(n: int, high_count: float, low: float, high: float) -> float:
    """99th percentile (linear interpolation) of n values, the top ``high_count`` of them ``high``."""
    if n <= 1:
        return high if high_count >= 0.5 else low
    pos = 0.99 * (n - 1)
    cut = n - high_count  # indices >= cut hold ``high``
    v = lambda i: high if i >= cut else low  # noqa: E731
    lo = math.floor(pos)
    return v(lo) + (v(lo + 1) - v(lo)) * (pos - lo)


def burst_mean_batch(n: int, stagger_ms: float, window_ms: float) -> float:
    """Mean batch of n decode windows of ``window_ms`` starting every ``stagger_ms`` on one GPU: the
    mean over requests of sum_j |window_j & window_k| / |window_k| (a burst on 1P1D)."""
    if n <= 0 or window_ms <= 0:
        return 0.0
    total = sum(max(0.0, window_ms - abs(j - k) * stagger_ms) for k in range(n) for j in range(n))
    return total / (n * window_ms)


class _Level:
    """f(t) = sum of h over the spans (start, end, h) that hold t: piecewise constant; its integral
    and its maximum over an interval in O(log n)."""

    def __init__(self, spans: Sequence[tuple[float, float, float]]) -> None:
        delta: dict[float, float] = {}
        for a, b, h in spans:
            if b > a:
                delta[a] = delta.get(a, 0.0) + h
                delta[b] = delta.get(b, 0.0) - h
        self.xs = sorted(delta)
        self.lv, self.cum = [], []
        level, cum = 0.0, 0.0
        for i, x in enumerate(self.xs):
            if i:
                cum += level * (x - self.xs[i - 1])
            level += delta[x]
            self.lv.append(level)
            self.cum.append(cum)
        self.table = [self.lv]  # sparse table of maxima over 2^j breakpoints
        while 2 ** len(self.table) <= len(self.lv):
            prev, half = self.table[-1], 2 ** (len(self.table) - 1)
            self.table.append([max(prev[i], prev[i + half]) for i in range(len(prev) - half)])

    def _at(self, t: float) -> int:
        return bisect.bisect_right(self.xs, t) - 1

    def integral(self, a: float, b: float) -> float:
        def f(t: float) -> float:
            i = self._at(t)
            return 0.0 if i < 0 else self.cum[i] + self.lv[i] * (t - self.xs[i])
        return f(b) - f(a)

    def level(self, t: float) -> float:
        i = self._at(t)
        return 0.0 if i < 0 else self.lv[i]

    def peak(self, a: float, b: float) -> float:
        lo, hi = max(self._at(a), 0), bisect.bisect_left(self.xs, b) - 1
        if hi < lo:
            return self.level(a)
        j = (hi - lo + 1).bit_length() - 1
        return max(self.table[j][lo], self.table[j][hi - 2 ** j + 1])


def _closed_loop(lay: Layout, w: Workload, c: Costs) -> tuple[list[tuple[float, ...]], float, float]:
    """Every request's (TTFT, TPOT, P99 ITL, decode GPU time it used), the duration (ms) and the
    prefill GPU time per prompt (W or s), by the recursion of the module docstring."""
    N, C, out_len, o, inp = w.n, w.concurrency, w.output_len, c.overhead_ms, w.input_len
    ctx = inp + out_len / 2
    colo = bool(lay.colocated or lay.shared_gpu)
    groups = lay.colocated or (1 if lay.shared_gpu else lay.decode)  # decode batches
    servers = groups if colo else lay.prefill  # prefill queues
    n_ch = math.ceil(inp / lay.chunk) if lay.colocated else 1
    work = c.chunk_overhead * c.prefill_ms(inp) if lay.colocated else c.prefill_ms(inp)
    tpot = [c.step_ms(1, ctx)] * N
    send, start, done, begin, end = ([0.0] * N for _ in range(5))
    levels: list[Optional[_Level]] = [None] * groups
    for _ in range(300):
        clients: list[float] = []  # client-side ends of requests in flight (a heap)
        free = [0.0] * servers
        active: list[list[float]] = [[] for _ in range(groups)]  # ends of windows holding a decode slot
        for i in range(N):
            send[i] = heapq.heappop(clients) if i >= C else 0.0
            q, g = i % servers, i % groups
            start[i] = max(send[i], free[q])
            lv = levels[g]
            busy = lv.level(start[i]) if colo and lv is not None else 0.0  # sequences decoding meanwhile
            # colocated: each chunk rides on a decode step; shared GPU: the two processes time-slice it
            if lay.shared_gpu:
                span = work * (1.0 + min(busy, 1.0))
            elif colo:  # a prompt alone is a plain prefill; riding on decode steps it costs phi times that
                span = (work if busy > 0 else c.prefill_ms(inp)) + n_ch * c.step_ms(busy, inp)
            else:
                span = work
            done[i] = free[q] = start[i] + span
            slots = active[g]
            while slots and slots[0] <= done[i]:
                heapq.heappop(slots)
            begin[i] = max(done[i], heapq.heappop(slots)) if len(slots) >= c.max_batch else done[i]
            end[i] = begin[i] + (out_len - 1) * tpot[i]
            heapq.heappush(slots, end[i])
            heapq.heappush(clients, end[i] + o)
        out = []
        for g in range(groups):
            ks = range(g, N, groups)
            levels[g] = lv = _Level([(begin[k], end[k], 1.0) for k in ks])
            pre = _Level([(start[k], done[k], 1.0 / (done[k] - start[k])) for k in ks]) if colo else None
            for k in ks:
                bbar = min(max(lv.integral(begin[k], end[k]) / (end[k] - begin[k]), 1.0), float(c.max_batch))
                frac = pre.integral(begin[k], end[k]) if pre is not None else 0.0
                low = c.step_ms(bbar, ctx)
                if lay.shared_gpu:  # steps during the other process's prefill run at half speed
                    itl = _p99_of_two(out_len - 1, frac * work / low, low, 2 * low)
                elif colo:  # mixed steps carry a chunk each
                    itl = _p99_of_two(out_len - 1, n_ch * frac, low, low + work / n_ch)
                else:  # the largest batch it rode in
                    itl = c.step_ms(min(lv.peak(begin[k], end[k]), c.max_batch), ctx)
                out.append((k, low + work * frac / (out_len - 1), itl, (out_len - 1) * low / bbar))
        out.sort()
        delta = max(abs(r[1] - t) for r, t in zip(out, tpot))
        tpot = [(r[1] + t) / 2 for r, t in zip(out, tpot)]  # damped: the windows move with the TPOTs
        if delta < 1e-3:
            break
    res: list[tuple[float, ...]] = [(done[k] - send[k] + o, tpot[k] + (begin[k] - done[k]) / (out_len - 1), out[k][2], out[k][3]) for k in range(N)]
    return res, max(end) + o, work


def _bisect(f: Callable[[float], float], lo: float, hi: float, iters: int = 100) -> float:
    """x in [lo, hi] where the increasing function f crosses 0."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def steady_state(lay: Layout, w: Workload, c: Costs) -> dict[str, float]:
    """The closed loop's long-run state at concurrency C (the module docstring's balance): requests
    per second, decode batch per GPU, TTFT and TPOT (ms)."""
    ctx, out, C, o = w.input_len + w.output_len / 2, w.output_len, w.concurrency, c.overhead_ms
    if lay.colocated or lay.shared_gpu:
        reps, m = lay.colocated or 1, w.concurrency / (lay.colocated or 1)
        n_ch = math.ceil(w.input_len / lay.chunk) if lay.colocated else 1
        work = c.chunk_overhead * c.prefill_ms(w.input_len) if lay.colocated else c.prefill_ms(w.input_len)

        def x_col(b: float) -> float:  # requests per ms one replica finishes with b decoding
            return b / ((out - 1) * c.step_ms(b, ctx) + b * work) if b > 0 else 0.0

        b = min(_bisect(lambda b: b + x_col(b) * (work + n_ch * c.step_ms(b, w.input_len) + o) - m, 0.0, m), float(c.max_batch))
        x = x_col(b)
        n_p = max(m - b - x * o, 0.0)
        return {"req_per_s": reps * x * 1e3, "batch": b, "ttft_ms": o + (n_p / x if x > 0 else work),
                "tpot_ms": c.step_ms(b, ctx) + b * work / (out - 1)}
    s = c.prefill_ms(w.input_len)

    def x_dec(cd: float) -> float:  # requests per ms the decode GPUs finish with cd decoding
        b = min(cd / lay.decode, c.max_batch)
        return lay.decode * b / ((out - 1) * c.step_ms(b, ctx)) if b > 0 else 0.0

    def gap(cd: float) -> float:
        n_p = C - cd - x_dec(cd) * o
        return x_dec(cd) - (min(n_p, lay.prefill) / s if n_p > 0 else 0.0)

    cd = _bisect(gap, 0.0, float(C))
    x, b = x_dec(cd), min(cd / lay.decode, c.max_batch)
    n_p = max(C - cd - x * o, 0.0)
    return {"req_per_s": x * 1e3, "batch": b, "ttft_ms": o + (n_p / x if x > 0 else s), "tpot_ms": c.step_ms(b, ctx)}


def predict(lay: Layout, w: Workload, c: Costs, slos: Sequence[SLO] = SLOS) -> Prediction:
    """The model's prediction of one load point (see the module docstring for every formula)."""
    res, end, work = _closed_loop(lay, w, c)
    dur = end / 1e3
    ttft, tpot, itl = [r[0] for r in res], [r[1] for r in res], [r[2] for r in res]
    good = {slo.name: sum(1 for t, i in zip(tpot, itl) if slo.met(t, i)) / dur for slo in slos}
    dec_ms = sum(r[3] for r in res)
    if lay.colocated or lay.shared_gpu:
        busy = {"colocated" if lay.colocated else "shared": min(1.0, (dec_ms + w.n * work) / (lay.gpus * end))}
    else:
        busy = {"prefill": min(1.0, w.n * work / (lay.prefill * end)), "decode": min(1.0, dec_ms / (lay.decode * end))}
    return Prediction(lay.name, w, ttft, tpot, itl, dur, w.n * w.output_len / dur, w.n / dur, good, busy, steady_state(lay, w, c))


def _solve(rows: list[list[float]], ys: list[float]) -> Optional[list[float]]:
    """Least squares by the normal equations (columns scaled to 1); None when they are collinear."""
    k = len(rows[0])
    scale = [max(abs(r[i]) for r in rows) or 1.0 for i in range(k)]
    xs = [[r[i] / scale[i] for i in range(k)] for r in rows]
    a = [[sum(x[i] * x[j] for x in xs) for j in range(k)] + [sum(x[i] * y for x, y in zip(xs, ys))] for i in range(k)]
    for col in range(k):
        piv = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-9 * max(1.0, max(abs(a[i][i]) for i in range(k))):
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * p for v, p in zip(a[r], a[col])]
    return [a[i][k] / a[i][i] / scale[i] for i in range(k)]


def fit_nonneg(rows: Sequence[Sequence[float]], ys: Sequence[float], names: Sequence[str]) -> dict[str, float]:
    """Least-squares coefficients >= 0 of ``names`` (the features of each row, most important first):
    a feature the points cannot tell apart from the others (the last such first) or whose
    coefficient comes out negative (the most negative) is dropped (0) and the rest refitted."""
    if len(rows) != len(ys) or not rows:
        raise ValueError("fit: need at least one point, one value per point")
    active = list(range(len(names)))
    while active:
        coef = _solve([[r[i] for i in active] for r in rows], list(ys)) if len(rows) >= len(active) else None
        if coef is None:
            active.pop()
            continue
        if min(coef) >= 0:
            out = dict.fromkeys(names, 0.0)
            out.update({names[i]: c for i, c in zip(active, coef)})
            return out
        active.pop(coef.index(min(coef)))
    raise ValueError(f"fit: no non-negative fit of {list(names)} to {len(rows)} points")


def fit_decode(points: Sequence[tuple[float, float, float]]) -> dict[str, float]:
    """Decode step costs from measured (batch, mean context, step ms) points: T_d = a + g*B*L + b*B.
    One point gives a flat step (a only); points of one context give a and g (B*L and B are then
    proportional); points of several contexts all three."""
    return fit_nonneg([(1.0, b * ctx, b) for b, ctx, _ in points], [ms for *_, ms in points],
                      ("alpha_ms", "per_kv_token_ms", "per_seq_ms"))


def fit_prefill(points: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Prefill costs from measured (prompt tokens, GPU ms per prompt) points: s = p1*I + p2*I^2 (one
    prompt length gives p1 only)."""
    return fit_nonneg([(float(i), float(i) * i) for i, _ in points], [ms for _, ms in points],
                      ("prefill_per_token_ms", "prefill_per_token2_ms"))


def layouts_for(gpus: int, chunk: int = 2048) -> list[Layout]:
    """Every xPyD with x + y = gpus, and ``gpus`` colocated replicas."""
    return [Layout(prefill=x, decode=gpus - x) for x in range(1, gpus)] + [Layout(colocated=gpus, chunk=chunk)]


def choose(gpus: int, input_len: int, output_len: int, c: Costs, slo: SLO, concurrencies: Sequence[int],
           chunk: int = 2048, waves: int = 1) -> list[tuple[str, float, int]]:
    """Layouts of ``gpus`` GPUs ranked by their best predicted goodput under ``slo`` over
    ``concurrencies``: [(layout, goodput req/s, at concurrency)], best first."""
    out = []
    for lay in layouts_for(gpus, chunk):
        best = (0.0, -concurrencies[0])  # ties go to the lower concurrency
        for conc in concurrencies:
            p = predict(lay, Workload(input_len, output_len, conc, conc * waves), c, [slo])
            best = max(best, (p.goodput[slo.name], -conc))
        out.append((lay.name, best[0], -best[1]))
    return sorted(out, key=lambda r: -r[1])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--costs", required=True, help="JSON file of Costs fields (or a pd_layout_fit output with a 'costs' key)")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--layouts", nargs="*", default=None, help="default: every xPyD on --gpus GPUs and --gpus colocated")
    ap.add_argument("--shape", default="3500:1500", help="INPUT:OUTPUT tokens")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--waves", type=float, default=1.0, help="requests per point = waves x concurrency")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--slo", action="append", default=None, help="tpot:MS[,itl:MS] (repeat); default the issue's four")
    a = ap.parse_args(argv)
    try:
        doc = json.load(open(a.costs))
        c = Costs.from_dict(doc.get("costs", doc))
        inp, out = (int(x) for x in a.shape.split(":"))
        slos = [SLO.parse(x) for x in a.slo] if a.slo else list(SLOS)
        lays = [Layout.parse(x, a.chunk) for x in a.layouts] if a.layouts else layouts_for(a.gpus, a.chunk)
    except (OSError, ValueError, TypeError) as exc:
        print(f"pd_layout_model: {exc}", file=sys.stderr)
        return 2
    print("| layout | conc | out tok/s | TTFT p50 / p99 ms | TPOT p50 ms | P99 ITL p50 ms | " + " | ".join(s.name for s in slos) + " |")
    print("|" + "---|" * (6 + len(slos)))
    for lay in lays:
        for conc in a.concurrency:
            p = predict(lay, Workload(inp, out, conc, max(conc, int(conc * a.waves))), c, slos)
            print(f"| {lay.name} | {conc} | {p.output_throughput:.0f} | {p.percentile('ttft_ms', 50):.0f} / {p.percentile('ttft_ms', 99):.0f} "
                  f"| {p.percentile('tpot_ms', 50):.1f} | {p.percentile('p99_itl_ms', 50):.1f} | "
                  + " | ".join(f"{p.goodput[s.name]:.2f}" for s in slos) + " |")
    for slo in slos:
        ranked = choose(a.gpus, inp, out, c, slo, a.concurrency, a.chunk, int(a.waves))
        print(f"\n{slo.name}: " + ", ".join(f"{n} {g:.2f} req/s (c={k})" for n, g, k in ranked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
