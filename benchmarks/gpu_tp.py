"""Tensor parallelism on the 2-GPU machine (issue 19), each figure against a floor measured in the
same run.  ``benchmarks/gpu_tp.sh`` runs it after tests/gpu/test_tp_gpu.py, in one command:

    python3 benchmarks/gpu_tp.py --out $OUT --budget 330 [--tests $OUT/tp_tests.log] [stages]
    python3 benchmarks/gpu_tp.py --out /tmp/x --cpu-smoke            # the same code paths on CPU (gloo)

Stages (default ``allreduce decode llama8b``; ``mesh`` is in benchmarks/gpu_tp_mesh.py):

allreduce  each all-reduce at decode sizes (batch 1..128 x hidden 4096 / 5120, bf16) between the two
           GPUs inside a CUDA graph, as decode steps run it: NCCL, PyTorch symmetric memory
           (one-shot, two-shot), FlashInfer's custom all-reduce (vLLM's kernel), and FlashInfer's
           all-reduce fused with residual add + RMSNorm against NCCL + FlashInfer's
           ``fused_add_rmsnorm``; every one checked against NCCL before it is timed (a failure is
           recorded, never fatal); the logits all-gather too.  ``fastest`` per size.
decode     qwen3-32b dummy at TP 2 (GPUs 0,1), decode step at batch 1 and 64 with 2k context, with
           NCCL and with each other ``--tp-all-reduce`` that worked above, against its floor = rank
           0's bytes (weights + its KV heads of the batch) / HBM copy bandwidth + (2 x layers + 1)
           all-reduces + one logits all-gather at the times measured above (goal <= 1.35x).
llama8b    llama-3.1-8b decode step at TP 1 (GPU 0) and TP 2 (GPUs 0,1), batch 1 and 64, 2k context.

Tokens before speed: with ``--tests`` (pytest's -v output) nothing is measured unless the exact token
tests passed (TP 2 = TP 1 in float32; decode graphs with the all-reduce inside = eager).  Each
measured TP-2 engine is also checked against a TP-1 engine of the same preset (built first, eager):
its logits after a 300-token prompt within 3e-2 (relative, bf16) and its greedy tokens compared
(matching prefix reported; bf16 sums in another order at another TP size, so only the logits gate).
A row whose check fails has no step time.

``--budget`` (seconds) bounds the whole run: a stage or a point that would not fit is skipped and
says so in the JSON.  Results: tp_allreduce.json, tp_decode.json (OUT), printed as a table by
benchmarks/gpu_tp_report.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REQUIRED_TESTS = ("test_tp2_tokens_equal_tp1_in_float32", "test_tp2_decode_graphs[nccl]")
"""Tests whose pass is required before any speed is measured."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(out: Path, name: str, doc) -> None:
    (out / name).write_text(json.dumps(doc, indent=1) + "\n")


class Clock:
    """The run's time budget."""

    def __init__(self, budget: float) -> None:
        self.end = time.monotonic() + budget

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, seconds: float, what: str) -> bool:
        if self.left() >= seconds:
            return True
        log(f"skipped {what}: {self.left():.0f} s left, it needs about {seconds:.0f} s")
        return False


def tests_passed(log_path: Path) -> tuple[bool, dict]:
    """(every required test passed, {test name: outcome}) from pytest's ``-v`` output (written as
    tests finish, so a run cut short by its time limit still counts what it ran)."""
    res = {}
    for m in re.finditer(r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", log_path.read_text(errors="replace")):
        res[m.group(1)] = m.group(2).lower()
    return all(res.get(t) == "passed" for t in REQUIRED_TESTS), res


# ---------------------------------------------------------------------------------------- all-reduce
def _timer(cuda: bool):
    """Median seconds of one ``fn()``: inside a CUDA graph of ``reps`` calls (no launch overhead) on
    GPUs, wall time on CPU (the smoke run)."""

    def graph_time(fn, reps: int = 20, replays: int = 15) -> float:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        times = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / reps)
        return statistics.median(times)

    def wall_time(fn, reps: int = 5, replays: int = 3) -> float:
        times = []
        for _ in range(replays):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t) / reps)
        return statistics.median(times)

    return graph_time if cuda else wall_time


def _impls(rank: int, dev: torch.device, errors: dict) -> dict:
    """name -> fn(x [B, H] bf16) -> all-reduced [B, H]; each that can be set up on this machine."""
    import torch.distributed as dist

    def nccl(x):
        dist.all_reduce(x)
        return x

    impls = {"nccl" if dev.type == "cuda" else "gloo": nccl}
    if dev.type != "cuda":
        return impls
    group = dist.group.WORLD
    try:
        import torch.distributed._symmetric_memory as symm

        if hasattr(symm, "enable_symm_mem_for_group"):
            symm.enable_symm_mem_for_group(group.group_name)
        sbuf = symm.empty(8 << 20, dtype=torch.bfloat16, device=dev)
        symm.rendezvous(sbuf, group.group_name)

        def one_shot(x):
            sbuf[:x.numel()].copy_(x.view(-1))
            return torch.ops.symm_mem.one_shot_all_reduce(sbuf[:x.numel()], "sum", group.group_name)

        def two_shot(x):
            sbuf[:x.numel()].copy_(x.view(-1))
            torch.ops.symm_mem.two_shot_all_reduce_(sbuf[:x.numel()], "sum", group.group_name)
            return sbuf[:x.numel()]

        impls["symm_mem_one_shot"], impls["symm_mem_two_shot"] = one_shot, two_shot
    except Exception as exc:  # noqa: BLE001 - reported
        errors["symm_mem"] = repr(exc)[:500]
    try:
        import flashinfer.comm as comm

        max_size = 8 << 20
        meta = comm.create_shared_buffer(comm.vllm_meta_size() + max_size, group=group)
        rank_data = torch.empty(8 << 20, dtype=torch.uint8, device=dev)
        bufs = comm.create_shared_buffer(max_size, group=group)
        fa = comm.vllm_init_custom_ar(meta, rank_data, rank, True)
        fi_out = torch.empty(max_size // 2, dtype=torch.bfloat16, device=dev)

        def flashinfer_custom(x):
            out = fi_out[:x.numel()]
            comm.vllm_all_reduce(fa, x.view(-1), out, bufs[rank], max_size, 16)
            return out

        impls["flashinfer_custom"] = flashinfer_custom
    except Exception as exc:  # noqa: BLE001 - reported
        errors["flashinfer_custom"] = repr(exc)[:500]
    return impls


def _fused_norm(tp, hidden: int, batch: int, fused, timer) -> dict:
    """The all-reduce + residual add + RMSNorm after a row-parallel layer: FlashInfer's fused kernel
    (``pdmesh.distributed.fused``, checked against NCCL when it started) against NCCL + FlashInfer's
    fused_add_rmsnorm, as the model runs them."""
    import torch.distributed as dist
    from flashinfer.norm import fused_add_rmsnorm

    dev = tp.device
    x = torch.randn(batch, hidden, device=dev).to(torch.bfloat16)
    res = torch.randn(batch, hidden, device=dev).to(torch.bfloat16)
    w = torch.ones(hidden, device=dev, dtype=torch.bfloat16)

    def separate():
        y, r = x.clone(), res.clone()
        dist.all_reduce(y)
        fused_add_rmsnorm(y, r, w, 1e-6)
        return y

    row = {"hidden": hidden, "batch": batch, "nccl_then_norm_us": timer(separate) * 1e6}
    if fused is not None:
        row["flashinfer_fused_us"] = timer(lambda: fused.run(x, res, w, 1e-6)) * 1e6
    return row


def _allreduce_rank(rank: int, port: int, q, cuda: bool, sizes: list, fused_sizes: list) -> None:
    import torch.distributed as dist

    from pdmesh.distributed.group import TPGroup

    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    tp = TPGroup.join(rank, 2, dev, f"tcp://127.0.0.1:{port}", "nccl")
    timer = _timer(cuda)
    errors: dict = {}
    impls = _impls(rank, dev, errors)
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for hidden, batch in sizes:
        x = torch.randn(batch, hidden, device=dev).to(dtype)
        want = x.clone()
        dist.all_reduce(want)
        row = {"hidden": hidden, "batch": batch, "bytes": x.numel() * x.element_size()}
        for name, fn in impls.items():
            try:
                got = fn(x.clone()).reshape(-1).float()
                if not torch.allclose(got, want.view(-1).float(), rtol=2e-2, atol=2e-2):
                    raise RuntimeError("differs from NCCL")
                y = x.clone()
                row[f"{name}_us"] = timer(lambda fn=fn, y=y: fn(y)) * 1e6
            except Exception as exc:  # noqa: BLE001 - reported per size
                row[f"{name}_error"] = repr(exc)[:200]
        rows.append(row)
    fused = []
    if fused_sizes:
        from pdmesh.distributed.fused import FusedAllReduceNorm

        fn = FusedAllReduceNorm.create(tp, max(b for _, b in fused_sizes), max(h for h, _ in fused_sizes), torch.bfloat16)
        if fn is None:
            errors["flashinfer_fused_norm"] = "FusedAllReduceNorm.create gave up on every rank (see the log)"
        for hidden, batch in fused_sizes:
            fused.append(_fused_norm(tp, hidden, batch, fn, timer))
    gathers = []
    for vocab_half, batch in ((151936 // 2, 1), (151936 // 2, 64), (128256 // 2, 1), (128256 // 2, 64)):
        if not cuda:
            vocab_half //= 64
        part = torch.randn(batch, vocab_half, device=dev)
        parts = [torch.empty_like(part) for _ in range(2)]
        t = timer(lambda parts=parts, part=part: dist.all_gather(parts, part), reps=5, replays=10)
        gathers.append({"batch": batch, "vocab_per_rank": vocab_half, "bytes": part.numel() * 4, "us": t * 1e6})
    if rank == 0:
        q.put({"all_reduce": rows, "fused_norm": fused, "logits_all_gather": gathers, "errors": errors})
    dist.barrier()
    tp.destroy()


def stage_allreduce(out: Path, cuda: bool, with_flashinfer: bool) -> dict:
    from tests.meshproc import free_port

    hiddens = (4096, 5120) if cuda else (256,)
    sizes = [(h, b) for h in hiddens for b in (1, 8, 32, 64, 128)]
    fused_sizes = [(5120, b) for b in (1, 8, 64)] if with_flashinfer else []
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, port, q, cuda, sizes, fused_sizes)) for r in range(2)]
    for p in procs:
        p.start()
    import queue

    try:
        deadline = time.monotonic() + 420
        while True:
            try:
                res = q.get(timeout=1)
                break
            except queue.Empty:
                dead = [p.exitcode for p in procs if not p.is_alive() and p.exitcode != 0]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"all-reduce ranks failed (exit codes {dead}) or timed out") from None
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    for row in res["all_reduce"]:
        impls = {k[:-3]: v for k, v in row.items() if k.endswith("_us")}
        row["fastest"] = min(impls, key=impls.get) if impls else None
        log(f"all-reduce {row['batch']:>3} x {row['hidden']}: " + ", ".join(f"{k} {v:.1f} us" for k, v in impls.items()))
    for row in res["fused_norm"]:
        log(f"all-reduce + add + RMSNorm {row['batch']:>3} x {row['hidden']}: NCCL then norm {row['nccl_then_norm_us']:.1f} us, "
            f"fused {row.get('flashinfer_fused_us', float('nan')):.1f} us")
    for k, v in res["errors"].items():
        log(f"all-reduce {k} unavailable: {v}")
    save(out, "tp_allreduce.json", res)
    return res


def comm_time(ar: dict, hidden: int, batch: int, vocab: int) -> float:
    """Floor seconds of one decode step's collectives at TP 2: (2 x layers + 1) all-reduces of
    [batch, hidden] are counted by the caller from this with ``vocab`` 0 (one all-reduce at the
    fastest implementation measured for that size: a floor); with ``vocab`` > 0, the logits
    all-gather of the nearest measured size."""
    if vocab:
        g = min(ar["logits_all_gather"], key=lambda r: (abs(r["vocab_per_rank"] * 2 - vocab), abs(r["batch"] - batch)))
        return g["us"] * 1e-6
    row = min(ar["all_reduce"], key=lambda r: (abs(r["hidden"] - hidden), abs(r["batch"] - batch)), default=None)
    times = [v for k, v in (row or {}).items() if k.endswith("_us")]
    return min(times) * 1e-6 if times else float("nan")


# ---------------------------------------------------------------------------------------- decode step
CHECK_PROMPTS = 2
CHECK_LEN = 300
CHECK_OUT = 8


def _check_prompts(vocab: int) -> list[list[int]]:
    return [[(j * 104729 + i * 7919) % (vocab - 2) + 1 for i in range(CHECK_LEN)] for j in range(CHECK_PROMPTS)]


def _greedy(eng, prompts: list[list[int]], n: int) -> list[list[int]]:
    from pdmesh.engine import SamplingParams

    for i, p in enumerate(prompts):
        eng.add_request(f"check-{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    got: dict[str, list[int]] = {}
    while eng.has_work():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [got[f"check-{i}"] for i in range(len(prompts))]


def reference_check(eng) -> dict:
    """What a TP-1 engine gives on the check prompts: greedy tokens and the logits after prompt 0."""
    prompts = _check_prompts(eng.arch.vocab_size)
    return {"tokens": _greedy(eng, prompts, CHECK_OUT), "logits": eng.score(prompts[0]).float().cpu()}


def compare(eng, ref: dict) -> dict:
    """This engine against a TP-1 reference: relative logits difference (gates) and greedy tokens."""
    prompts = _check_prompts(eng.arch.vocab_size)
    logits = eng.score(prompts[0]).float().cpu()
    rel = ((logits - ref["logits"]).norm() / ref["logits"].norm()).item()
    tokens = _greedy(eng, prompts, CHECK_OUT)
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(tokens, ref["tokens"])]
    return {"logits_rel_diff": rel, "tokens_matching_prefix": prefix, "tokens_of": CHECK_OUT, "ok": rel < 3e-2}


def build(preset: str, tp: int, devices: str, max_seqs: int, max_len: int, impl: str = "nccl", eager: bool = False,
          cpu: bool = False, blocks: int = 0):
    from pdmesh.engine.engine import LLMEngine
    from pdmesh.testing import engine_config

    cfg = engine_config(preset, device=devices, max_num_seqs=max_seqs, max_model_len=max_len, eager=eager,
                        max_tokens_step=8192 if not cpu else 512, tensor_parallel_size=tp, tp_all_reduce=impl,
                        dtype="float32" if cpu else "bfloat16", num_kv_blocks=blocks or None, block_size=32 if not cpu else 16)
    return LLMEngine(cfg)


def _sync(eng) -> None:
    if eng.device.type == "cuda":
        torch.cuda.synchronize()


def steady_step(eng, steps: int = 20) -> float:
    """Seconds per step over ``steps`` consecutive decode steps (async scheduling overlapping host work)."""
    _sync(eng)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    _sync(eng)
    return (time.perf_counter() - t0) / steps


def decode_points(eng, batches: list[int], ctx: int, hbm: float, ar: dict | None, clock: Clock, label: str,
                  check: dict | None) -> list[dict]:
    """The decode step of ``eng`` at each batch size (context ``ctx``) against its floor."""
    from pdmesh.engine import SamplingParams

    arch, tp = eng.arch, eng.tp
    rank_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())  # rank 0's shard
    kv_tok = eng.pool.layout.head_block_bytes(eng.pool.layout.local_kv_heads) // eng.pool.block_size
    impl = tp.all_reduce_impl
    base = {"label": label, "model": eng.resolved.served_name, "tp": tp.size, "all_reduce": impl, "context": ctx,
            "cuda_graphs": eng.runner.graphs is not None, "async_scheduling": eng.async_scheduling, "check": check}
    out = []
    for b in batches:
        row = dict(base, batch=b)
        out.append(row)
        if check is not None and not check["ok"]:
            row["skipped"] = "tokens/logits differ from the TP-1 engine: no speed reported"
            continue
        if not clock.fits(25 + b * ctx / 20000, f"{label} batch {b}"):
            row["skipped"] = "time budget"
            continue
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        for i in range(b):
            eng.add_request(f"{label}-{b}-{i}", [(i * 131 + j * 7) % min(30000, arch.vocab_size - 20) + 10 for j in range(ctx)], params)
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        for _ in range(2 if eng.device.type != "cuda" else 5):
            eng.step()
        start_len = statistics.mean(s.num_tokens for s in eng.scheduler.running)
        cpu = eng.device.type != "cuda"
        step = statistics.median(steady_step(eng, 3 if cpu else 20) for _ in range(3 if cpu else 7))
        mean_ctx = (start_len + statistics.mean(s.num_tokens for s in eng.scheduler.running)) / 2
        mem = (rank_bytes + b * mean_ctx * kv_tok) / hbm
        comm = 0.0
        if tp.size > 1 and ar is not None:
            comm = (2 * arch.num_layers + 1) * comm_time(ar, arch.hidden_size, b, 0) + \
                comm_time(ar, arch.hidden_size, b, arch.vocab_size)
        floor = mem + comm
        row.update(mean_context=mean_ctx, step_ms=step * 1e3, floor_ms=floor * 1e3, floor_memory_ms=mem * 1e3,
                   floor_comm_ms=comm * 1e3, ratio=step / floor)
        log(f"{label} batch {b}: step {step * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms "
            f"(memory {mem * 1e3:.2f} + comm {comm * 1e3:.2f}), ratio {step / floor:.2f}")
        for s in list(eng.scheduler.running):
            eng.abort(s.request_id)
        while eng.has_work():
            eng.step()
    return out


def _release(eng) -> None:
    eng.close()
    del eng
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_preset(preset: str, tps: list[tuple[int, str, str]], batches: list[int], ctx: int, hbm: float,
                   ar: dict | None, clock: Clock, cpu: bool, est_build: float, refs: dict) -> list[dict]:
    """A TP-1 reference engine (its check tokens and logits, kept in ``refs``; measured too when
    ``tps`` holds TP 1), then each (tp, devices, all-reduce) engine: checked against it, then measured."""
    rows = []
    blocks = max(batches) * -(-(ctx + 512) // (16 if cpu else 32)) + 64
    ref_dev = "cpu" if cpu else "cuda:0"
    measure_tp1 = any(tp == 1 for tp, _, _ in tps)
    if preset not in refs or measure_tp1:
        if not clock.fits(est_build, f"{preset} TP-1 reference"):
            return [{"model": preset, "skipped": "time budget"}]
        eng = build(preset, 1, ref_dev, max(batches) if measure_tp1 else CHECK_PROMPTS, ctx + 512, eager=not measure_tp1,
                    cpu=cpu, blocks=blocks if measure_tp1 else 2 * -(-(ctx + 512) // (16 if cpu else 32)) + 16)
        refs[preset] = reference_check(eng)
        if measure_tp1:
            rows += decode_points(eng, batches, ctx, hbm, None, clock, f"{preset} TP 1", None)
        _release(eng)
    ref = refs[preset]
    for tp, devices, impl in tps:
        if tp == 1:
            continue
        label = f"{preset} TP {tp} {impl}"
        if not clock.fits(est_build, label):
            rows.append({"label": label, "skipped": "time budget"})
            continue
        t0 = time.monotonic()
        eng = build(preset, tp, devices, max(batches), ctx + 512, impl=impl, cpu=cpu, blocks=blocks)
        built = time.monotonic() - t0
        check = compare(eng, ref)
        log(f"{label} (all-reduce that ran: {eng.tp.all_reduce_impl}) vs TP 1: logits rel diff {check['logits_rel_diff']:.2e}, "
            f"greedy tokens matching {check['tokens_matching_prefix']} of {CHECK_OUT}: {'ok' if check['ok'] else 'WRONG'}")
        pts = decode_points(eng, batches, ctx, hbm, ar, clock, label, check)
        for p in pts:
            p["engine_build_s"] = round(built, 1)
        rows += pts
        _release(eng)
    for r in rows:
        if r.get("tp", 1) > 1 and "step_ms" in r:
            one = next((x for x in rows if x.get("tp") == 1 and x.get("batch") == r["batch"] and "step_ms" in x), None)
            if one:
                r["speedup_over_tp1"] = one["step_ms"] / r["step_ms"]
    return rows


def hbm_bandwidth(cpu: bool) -> float:
    """Bytes/s of a large device copy (read + write)."""
    n = (256 << 20) if cpu else (4 << 30)
    x = torch.empty(n, dtype=torch.uint8, device="cpu" if cpu else "cuda")
    y = torch.empty_like(x)
    if cpu:
        t = _timer(False)(lambda: y.copy_(x))
    else:
        from benchmarks.gpu_bench import cuda_time

        t = cuda_time(lambda: y.copy_(x), iters=10)
    x = y = None  # free the memory (the closures above still name them)
    return 2 * n / t


def tiny_model(work: Path) -> str:
    """A random-config Qwen3 directory for --cpu-smoke (dummy weights): 4 heads / 2 KV heads, 2 layers."""
    d = work / "tiny-qwen3"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen3ForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False)))
    return str(d)


def report(out: Path) -> None:
    """The short table printed last: tests, all-reduces at decode sizes, decode steps, mesh layouts."""
    if (out / "tp_tests.log").is_file():
        _, tests = tests_passed(out / "tp_tests.log")
        print("TESTS " + ", ".join(f"{k} {v}" for k, v in tests.items()))
    if (out / "tp_allreduce.json").is_file():
        ar = json.loads((out / "tp_allreduce.json").read_text())
        for r in ar["all_reduce"]:
            us = " ".join(f"{k[:-3]}={v:.1f}" for k, v in r.items() if k.endswith("_us"))
            print(f"ALLREDUCE {r['batch']:>3}x{r['hidden']} us: {us} fastest={r['fastest']}")
        for r in ar["fused_norm"]:
            print(f"AR+ADD+NORM {r['batch']:>3}x{r['hidden']} us: nccl+norm={r['nccl_then_norm_us']:.1f} "
                  f"flashinfer_fused={r.get('flashinfer_fused_us', float('nan')):.1f}")
        for k, v in ar["errors"].items():
            print(f"ALLREDUCE unavailable {k}: {v[:160]}")
    if (out / "tp_decode.json").is_file():
        doc = json.loads((out / "tp_decode.json").read_text())
        if doc.get("refused"):
            print("DECODE NOT MEASURED: " + doc["refused"])
        for r in doc["points"]:
            chk = r.get("check") or {}
            head = f"DECODE {r.get('label', r.get('model'))} batch {r.get('batch', '-')}"
            if "step_ms" not in r:
                print(f"{head}: skipped ({r.get('skipped')})")
                continue
            print(f"{head} [{r['all_reduce'] or 'tp1'}, graphs={r['cuda_graphs']}]: step {r['step_ms']:.2f} ms, floor "
                  f"{r['floor_ms']:.2f} ms, ratio {r['ratio']:.2f}"
                  + (f", {r['speedup_over_tp1']:.2f}x TP 1" if "speedup_over_tp1" in r else "")
                  + (f", logits vs TP 1 {chk['logits_rel_diff']:.1e}" if chk else ""))
    for f in sorted(out.glob("mesh-*.json")):
        m = json.loads(f.read_text())
        print(f"MESH {m['layout']}: tokens_ok={m.get('tokens_ok')} ready {m.get('ready_s')} s "
              f"{m.get('bench_c16', m.get('error', ''))}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="directory for the JSON files")
    ap.add_argument("stages", nargs="*", default=["allreduce", "decode", "llama8b"],
                    help="allreduce, decode, llama8b")
    ap.add_argument("--budget", type=float, default=330, help="seconds this run may take")
    ap.add_argument("--tests", help="pytest -v output of tests/gpu/test_tp_gpu.py: measure nothing unless the token tests passed")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same code on CPU (gloo, a tiny model, no CUDA graphs)")
    ap.add_argument("--report", action="store_true", help="print the table of what OUT holds, and stop")
    a = ap.parse_args()
    out = Path(a.out)
    if a.report:
        return report(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(a.budget)
    cpu = a.cpu_smoke
    doc: dict = {"stages": a.stages, "cpu_smoke": cpu, "points": []}
    if a.tests:
        ok, doc["tests"] = tests_passed(Path(a.tests))
        if not ok:
            doc["refused"] = f"required token tests did not pass: {[t for t in REQUIRED_TESTS if doc['tests'].get(t) != 'passed']}"
            log("NOT MEASURED: " + doc["refused"])
            save(out, "tp_decode.json", doc)
            sys.exit(2)
    if not cpu and torch.cuda.device_count() < 2:
        sys.exit("needs 2 GPUs (or --cpu-smoke)")
    ar = None
    if "allreduce" in a.stages and clock.fits(40, "allreduce"):
        ar = stage_allreduce(out, not cpu, with_flashinfer=not cpu and clock.left() > 240)
    hbm = hbm_bandwidth(cpu)
    doc["hbm_bytes_per_s"] = hbm
    log(f"copy bandwidth {hbm / 1e12:.3f} TB/s")
    work = Path(tempfile.mkdtemp())
    big, small = ("qwen3-32b", "llama-3.1-8b") if not cpu else (tiny_model(work), tiny_model(work))
    ctx, batches = (2048, [1, 64]) if not cpu else (64, [1, 4])
    devs = "cpu" if cpu else "cuda:0,1"
    refs: dict = {}
    if "decode" in a.stages:  # NCCL first; the other all-reduces after llama8b (less important if time runs out)
        doc["points"] += measure_preset(big, [(2, devs, "nccl")], batches, ctx, hbm, ar, clock, cpu, 10 if cpu else 75, refs)
        save(out, "tp_decode.json", doc)
    if "llama8b" in a.stages:
        tps = [(1, "cpu" if cpu else "cuda:0", "nccl"), (2, devs, "nccl")]
        doc["points"] += measure_preset(small, tps, batches, ctx, hbm, ar, clock, cpu, 10 if cpu else 45, refs)
        save(out, "tp_decode.json", doc)
    if "decode" in a.stages and ar is not None and not cpu:  # each other --tp-all-reduce whose kernel worked above
        others = []
        if any("symm_mem_one_shot_us" in r or "symm_mem_two_shot_us" in r for r in ar["all_reduce"]):
            others.append("symm_mem")
        if any("flashinfer_fused_us" in r for r in ar["fused_norm"]):
            others.append("flashinfer")  # the engine's --tp-all-reduce flashinfer is the fused kernel
        if others:
            doc["points"] += measure_preset(big, [(2, devs, k) for k in others], batches, ctx, hbm, ar, clock, cpu, 75, refs)
    save(out, "tp_decode.json", doc)
    log(f"done; {clock.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
