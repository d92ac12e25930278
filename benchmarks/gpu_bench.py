"""GPU measurements for the engine and the cuda_ipc transport, each against a floor measured in the
same run (see results/README.md). Usage: python benchmarks/gpu_bench.py --out results.json

* HBM floor: bytes a decode step must read (weights + the batch's KV) / bandwidth of a large
  device copy (2 x bytes per copy: read + write).
* Compute floor: prefill FLOPs (2 x matmul params x tokens + causal attention) / a large bf16 matmul.
* KV pull: a 3,500-token prompt's blocks through cuda_ipc vs a contiguous device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time

import torch

from pdmesh.engine import SamplingParams
from pdmesh.engine.engine import LLMEngine
from pdmesh.testing import engine_config


def cuda_time(fn, iters=20, warmup=3) -> float:
    """Median seconds of fn() with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def hbm_bandwidth() -> float:
    x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), iters=10)
    x = y = None  # free the memory (closures above still name them)
    torch.cuda.empty_cache()
    return 2 * (4 << 30) / t


def matmul_flops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = cuda_time(lambda: a @ b, iters=20)
    return 2 * 8192**3 / t


def _release() -> None:
    """Give a finished engine's GPU memory back before the next one (engines hold reference cycles)."""
    gc.collect()
    torch.cuda.empty_cache()


def wall_step(eng: LLMEngine) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _sync() -> None:
    if torch.cuda.is_available():  # (the CPU smoke runs of the GPU scripts share these helpers)
        torch.cuda.synchronize()


def steady_step(eng: LLMEngine, steps: int = 20) -> float:
    """Seconds per step over ``steps`` consecutive steps (as a serving loop runs them: with async
    scheduling, step N+1's host work overlaps step N on the GPU)."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    _sync()
    return (time.perf_counter() - t0) / steps


def decode_point(eng: LLMEngine, preset: str, b: int, ctx: int, hbm: float, keep: bool = False,
                 reps: int = 7, steps: int = 20) -> dict:
    """``b`` requests of ``ctx`` prompt tokens prefilled, then the steady decode step (median of
    ``reps`` runs of ``steps`` steps) against the HBM floor (bytes of every parameter + the batch's
    KV at its mean context, at the pool's element size). ``keep``: leave the requests running."""
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    for i in range(b):
        eng.add_request(f"{preset}-{b}-{i}", [(i * 131 + j * 7) % 30000 + 10 for j in range(ctx)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(5):
        eng.step()
    param_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    kv_tok = eng.arch.kv_bytes_per_token(eng.pool.kv.element_size())
    start_len = statistics.mean(s.num_tokens for s in eng.scheduler.running)
    step = statistics.median(steady_step(eng, steps) for _ in range(reps))
    mean_ctx = (start_len + statistics.mean(s.num_tokens for s in eng.scheduler.running)) / 2
    floor = (param_bytes + b * mean_ctx * kv_tok) / hbm
    out = {"model": preset, "batch": b, "context": ctx, "cuda_graphs": eng.runner.graphs is not None,
           "async_scheduling": eng.async_scheduling,
           "decode_attention": "triton" if getattr(eng.backend, "triton_decode", False) else eng.backend.name,
           "launched_behind": eng.num_steps_launched_behind,
           "mean_context": mean_ctx, "step_ms": step * 1e3, "floor_ms": floor * 1e3, "ratio": step / floor}
    if not keep:
        for s in list(eng.scheduler.running):
            eng.abort(s.request_id)
    return out


def decode_step_times(preset: str, batches: list[int], ctx: int, eager: bool, hbm: float,
                      async_scheduling: str = "auto", decode_attention: str = "auto") -> list[dict]:
    eng = LLMEngine(engine_config(preset, eager=eager, max_num_seqs=max(batches), max_model_len=ctx + 512,
                                  max_tokens_step=8192, async_scheduling=async_scheduling,
                                  decode_attention=decode_attention))
    out = [decode_point(eng, preset, b, ctx, hbm) for b in batches]
    eng = None  # free the memory (closures above still name them)
    _release()
    return out


def profile_decode(preset: str, batch: int, steps: int = 200) -> dict:
    """cProfile of decode steps (CUDA graphs on): where the host time of a step goes."""
    import cProfile
    import io
    import pstats

    eng = LLMEngine(engine_config(preset, max_num_seqs=max(batch, 2), max_model_len=2560, max_tokens_step=8192))
    for i in range(batch):
        eng.add_request(f"prof{i}", [(i * 7 + j) % 30000 + 10 for j in range(2048)],
                        SamplingParams(temperature=0, max_tokens=steps + 50, ignore_eos=True))
    while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running):
        eng.step()
    for _ in range(10):
        eng.step()
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        eng.step()
    prof.disable()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / steps
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    print(buf.getvalue(), flush=True)
    eng = None  # free the memory (closures above still name them)
    _release()
    return {"model": preset, "batch": batch, "profiled_step_ms": per_step * 1e3}


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    busy, cur_s, cur_e = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    return busy + (cur_e - cur_s if cur_e is not None else 0.0)


def decode_breakdown(preset: str, batch: int, steps: int = 20) -> dict:
    """Where a steady decode step's time goes (CUDA graphs, async as configured): step wall time;
    the graph replay, the logits and the argmax alone on the GPU (CUDA events); and the kernels of
    ``steps`` steps (torch.profiler): per kernel calls and microseconds per step, the GPU's busy
    time (union of kernels) and the span, so idle gaps show."""
    eng = LLMEngine(engine_config(preset, max_num_seqs=max(batch, 2), max_model_len=2560, max_tokens_step=8192))
    for i in range(batch):
        eng.add_request(f"kp{i}", [(i * 7 + j) % 30000 + 10 for j in range(2048)],
                        SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running):
        eng.step()
    for _ in range(10):
        eng.step()
    step = statistics.median(steady_step(eng) for _ in range(5))
    out = {"model": preset, "batch": batch, "step_ms": step * 1e3}
    graphs = eng.runner.graphs
    if graphs is not None:
        b = min(x for x in graphs.buckets if x >= batch)
        graph, _, hidden = graphs.graphs[b]
        out["graph_replay_ms"] = cuda_time(graph.replay, iters=30) * 1e3
        with torch.inference_mode():
            out["logits_ms"] = cuda_time(lambda: eng.model.compute_logits(hidden[:batch]), iters=30) * 1e3
            logits = eng.model.compute_logits(hidden[:batch])
            out["argmax_ms"] = cuda_time(lambda: logits.argmax(dim=-1), iters=30) * 1e3
    out.update(kernel_profile(eng, f"{preset} batch {batch}", steps, out))
    eng = None  # free the memory (closures above still name them)
    _release()
    return out


def kernel_profile(eng: LLMEngine, label: str, steps: int = 20, head: dict | None = None, top: int = 28) -> dict:
    """The kernels of ``steps`` steps of ``eng`` (its batch already decoding) under torch.profiler, in
    this process (rank 0 of a TP engine): the GPU's busy time per step (union of kernels), the span
    (so idle gaps show), kernels per step, and the ``top`` kernels by time (printed as a table, and
    returned as [name, us per step, calls per step, us per call])."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    iv = [(e.time_range.start, e.time_range.end) for e in kernels]
    out: dict = {}
    if iv:
        out["gpu_busy_ms_per_step"] = _busy_us(iv) / steps / 1e3
        out["gpu_span_ms_per_step"] = (max(b for _, b in iv) - min(a for a, _ in iv)) / steps / 1e3
    out["kernels_per_step"] = len(kernels) / steps
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    out["top_kernels"] = [[name[:110], sum(ts) / steps, len(ts) / steps, statistics.mean(ts)] for name, ts in rows]
    print(f"--- {label}: {json.dumps({**(head or {}), **{k: v for k, v in out.items() if k != 'top_kernels'}})}", flush=True)
    print(f"{'us/step':>8} {'calls/step':>10} {'us/call':>8}  kernel", flush=True)
    for name, per_step, calls, per_call in out["top_kernels"]:
        print(f"{per_step:8.1f} {calls:10.1f} {per_call:8.2f}  {name}", flush=True)
    return out


def prefill_time(preset: str, tokens: int, flops_peak: float) -> dict:
    eng = LLMEngine(engine_config(preset, max_num_seqs=4, max_model_len=tokens + 64, max_tokens_step=tokens + 64))
    arch = eng.arch
    matmul_params = sum(p.numel() for n, p in eng.model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if arch.tie_word_embeddings:
        matmul_params += arch.vocab_size * arch.hidden_size
    attn = 2 * arch.num_layers * arch.num_heads * arch.head_dim * tokens * tokens  # causal: QK^T + PV, half each
    flops = 2 * matmul_params * tokens + attn
    times = []
    for i in range(6):
        eng.add_request(f"p{i}", [(i * 17 + j * 13) % 30000 + 10 for j in range(tokens)],
                        SamplingParams(temperature=0, max_tokens=1))
        times.append(wall_step(eng))
        while eng.has_work():
            eng.step()
    t = statistics.median(times[1:])
    floor = flops / flops_peak
    eng = None  # free the memory (closures above still name them)
    _release()
    return {"model": preset, "tokens": tokens, "prefill_ms": t * 1e3, "floor_ms": floor * 1e3, "ratio": t / floor,
            "achieved_tflops": flops / t / 1e12}


def _pool_owner(preset: str, blocks: int, device: str, conn) -> None:
    from pdmesh.kv.pool import KVCachePool
    from pdmesh.models.loader import resolve
    from pdmesh.config import ModelConfig
    from pdmesh.transport.cuda_ipc import export_handle

    arch = resolve(ModelConfig(model=preset, load_format="dummy")).arch
    pool = KVCachePool(arch, blocks, 32, torch.bfloat16, torch.device(device))
    pool.kv.normal_()
    conn.send(export_handle(pool, "bench").SerializeToString())
    conn.recv()


def kv_pull(preset: str, tokens: int, src_dev: str, dst_dev: str) -> dict:
    from pdmesh.kv.pool import KVCachePool
    from pdmesh.config import ModelConfig
    from pdmesh.models.loader import resolve
    from pdmesh.kv.shards import plan_pieces
    from pdmesh.transport.cuda_ipc import CudaIpcTransport, open_handle
    from pdmesh.v1 import kv_transfer_pb2 as kpb

    arch = resolve(ModelConfig(model=preset, load_format="dummy")).arch
    n = -(-tokens // 32)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_pool_owner, args=(preset, 4 * n, src_dev, child))
    p.start()
    try:
        h = kpb.CudaIpcHandle.FromString(parent.recv())
        t0 = time.perf_counter()
        remote = open_handle(h)
        open_ms = (time.perf_counter() - t0) * 1e3
        dst = KVCachePool(arch, 4 * n, 32, torch.bfloat16, torch.device(dst_dev))
        tr = CudaIpcTransport(None, torch.device(dst_dev))  # type: ignore[arg-type]
        src_ids = list(range(0, 2 * n, 2))  # scattered source pages, as after real traffic
        dst_ids = list(range(3 * n, 2 * n, -1))[:n]
        nbytes = n * dst.layout.block_bytes
        ts = []
        for _ in range(25):
            t0 = time.perf_counter()
            for _, ev in tr.launch({0: remote}, [0], plan_pieces(dst.layout.num_kv_heads, 1, 1), src_ids, dst_ids, dst).timings:
                ev.synchronize()
            ts.append(time.perf_counter() - t0)
        pull = statistics.median(ts[3:])
        ok = torch.equal(dst.kv[:, dst_ids].cpu(), remote[:, src_ids].cpu())
        a = torch.empty(nbytes, dtype=torch.uint8, device=src_dev)
        b = torch.empty(nbytes, dtype=torch.uint8, device=dst_dev)
        ref = cuda_time(lambda: b.copy_(a), iters=20)
        return {"model": preset, "tokens": tokens, "src": src_dev, "dst": dst_dev, "bytes": nbytes, "open_ms": open_ms,
                "pull_ms": pull * 1e3, "contiguous_copy_ms": ref * 1e3, "fraction_of_copy_bw": ref / pull,
                "pull_gbps": nbytes / pull / 1e9, "data_equal": ok}
    finally:
        parent.send("bye")
        p.join(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--commit", default="")
    a = ap.parse_args()
    res: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                 "commit": a.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    res["hbm_bytes_per_s"] = hbm_bandwidth()
    res["bf16_flops"] = matmul_flops()
    print(f"HBM copy bandwidth {res['hbm_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {res['bf16_flops'] / 1e12:.0f} TFLOP/s", flush=True)

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    steps = [
        ("kv_pull", lambda: [kv_pull("llama-3.1-8b", 3500, "cuda:0", "cuda:0")]
         + ([kv_pull("llama-3.1-8b", 3500, "cuda:0", "cuda:1")] if torch.cuda.device_count() > 1 else [])),
        ("decode_llama", lambda: decode_step_times("llama-3.1-8b", [1, 64], 2048, False, res["hbm_bytes_per_s"])),
        ("decode_llama_fi_decode", lambda: decode_step_times("llama-3.1-8b", [1, 64], 2048, False, res["hbm_bytes_per_s"],
                                                             decode_attention="flashinfer")),
        ("decode_llama_sync", lambda: decode_step_times("llama-3.1-8b", [1, 64], 2048, False, res["hbm_bytes_per_s"], "off")),
        ("prefill_llama", lambda: [prefill_time("llama-3.1-8b", 3500, res["bf16_flops"])]),
        ("decode_qwen_graphs", lambda: decode_step_times("qwen2.5-0.5b", [1, 64], 2048, False, res["hbm_bytes_per_s"])),
        ("decode_qwen_fi_decode", lambda: decode_step_times("qwen2.5-0.5b", [1, 64], 2048, False, res["hbm_bytes_per_s"],
                                                            decode_attention="flashinfer")),
        ("decode_qwen_sync", lambda: decode_step_times("qwen2.5-0.5b", [1, 64], 2048, False, res["hbm_bytes_per_s"], "off")),
        ("profile_qwen", lambda: [profile_decode("qwen2.5-0.5b", 1)]),
        ("profile_qwen64", lambda: [profile_decode("qwen2.5-0.5b", 64)]),
        # One engine per process for these (the profiler keeps an engine's memory alive).
        ("breakdown_qwen1", lambda: [decode_breakdown("qwen2.5-0.5b", 1)]),
        ("breakdown_qwen64", lambda: [decode_breakdown("qwen2.5-0.5b", 64)]),
        ("breakdown_llama1", lambda: [decode_breakdown("llama-3.1-8b", 1)]),
        ("breakdown_llama64", lambda: [decode_breakdown("llama-3.1-8b", 64)]),
        ("decode_qwen_eager", lambda: decode_step_times("qwen2.5-0.5b", [1, 64], 2048, True, res["hbm_bytes_per_s"])),
    ]
    for name, fn in steps:
        if name in a.skip or (a.only and name not in a.only) or (not a.only and name.startswith(("breakdown", "profile"))):
            continue  # diagnostics (breakdown_*, profile_*) run only when named, one per process
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as exc:  # noqa: BLE001 - record and go on: one failure must not lose the rest
            res[name] = {"error": repr(exc)}
        print(f"{name} ({time.perf_counter() - t0:.0f}s): {json.dumps(res[name])}", flush=True)
        save()
    save()


if __name__ == "__main__":
    main()
