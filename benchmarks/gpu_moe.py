"""Mixture of experts on the GPU machine (issue 20): the fused layer checked against the reference,
then qwen3-30b-a3b's experts, decode and prefill steps against floors measured in the same run, and
TP 2 against EP 2.  ``benchmarks/gpu_moe.sh`` runs it after tests/gpu/test_moe_gpu.py, in one command:

    python3 benchmarks/gpu_moe.py --out $OUT --budget 330 [--layers 48] [stages]
    python3 benchmarks/gpu_moe.py --out /tmp/x --cpu-smoke         # the same code paths on CPU

Stages (default ``check kernel engine tpep``; ``flashinfer`` is separate, below):

check    ``fused_experts`` (Triton) against the float32 reference at qwen3-30b-a3b's expert shapes
         (128 experts, hidden 2048, width 768, top-8), 1 / 64 / 3,500 tokens, all experts and an EP
         rank's half: relative error < 2e-2, else nothing is measured (exit 2).
kernel   one MoE layer at 1, 64 and 3,500 tokens: the fused kernel with its default tiles, a small
         sweep of other tiles (the fastest is reported), and the reference kernel; floors: bytes of
         the experts actually routed to / copy bandwidth (decode sizes), 2 x pairs x 3 x H x I FLOPs /
         bf16 matmul rate (prefill), both measured in this run.
engine   qwen3-30b-a3b dummy (``--layers`` of its 48; all of them fit one H200 in bf16), CUDA graphs:
         decode step at batch 1 and 64 with 2k context against its floor = (weights read in the step:
         attention, norms, routers, LM head, and the experts the step's tokens are routed to, counted
         in one eager step; + the batch's KV) / copy bandwidth (goal <= 1.5x); prefill of 3,500 tokens
         against the compute floor of the active parameters (goal <= 1.5x).
tpep     the same model with ``--tp-layers`` layers on 2 GPUs: TP 1 (GPU 0), TP 2 splitting every
         expert's width, TP 2 with --enable-expert-parallel (whole experts per rank): decode at batch
         1 / 64 and prefill of 3,500 tokens; each TP-2 engine's logits after a 300-token prompt checked
         against TP 1's (relative, bf16, < 3e-2) before it is timed.
flashinfer  FlashInfer's ``cutlass_fused_moe`` (bf16, SM90 module compiled on first use: minutes) at
         the kernel stage's sizes, in a child process bounded by what is left of the budget; checked
         against the reference before it is timed; its compile cache goes back with the run.

``--budget`` (seconds) bounds the run: what would not fit is skipped and says so in the JSON
(moe.json in OUT; ``--report`` prints the table).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_tp import Clock, _release, hbm_bandwidth, log, save, steady_step  # noqa: E402
from pdmesh.models.presets import PRESETS  # noqa: E402

PRESET = "qwen3-30b-a3b"
CHECK_RTOL = 2e-2
TILE_SWEEP = [(16, 64, 64, 1, 4, 4), (16, 128, 64, 1, 4, 3), (16, 64, 128, 1, 8, 3), (32, 64, 64, 4, 4, 4),
              (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4)]
"""(block_m, block_n, block_k, group_m, num_warps, num_stages) tried at each size besides the default."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative (Frobenius) difference; 0 for two zero tensors (an EP rank none of whose experts was routed to)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def timer(cpu: bool):
    if cpu:
        def wall(fn, iters: int = 3) -> float:
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)
        return wall
    from benchmarks.gpu_bench import cuda_time

    return lambda fn, iters=20: cuda_time(fn, iters=iters)


def layer_inputs(shape: dict, tokens: int, dev: torch.device, dtype: torch.dtype, seed: int = 0):
    from pdmesh.models.moe import route

    g = torch.Generator(device=dev).manual_seed(seed)
    e, h, i, k = shape["experts"], shape["hidden"], shape["width"], shape["top_k"]
    gate_up = (torch.randn(e, 2 * i, h, device=dev, generator=g) * 0.02).to(dtype)
    down = (torch.randn(e, h, i, device=dev, generator=g) * 0.02).to(dtype)
    x = torch.randn(tokens, h, device=dev, generator=g).to(dtype)
    weights, ids = route(torch.randn(tokens, e, device=dev, generator=g), k, True, dtype)
    return x, gate_up, down, weights, ids


def experts_kernel(cpu: bool):
    """The kernel measured as 'fused': Triton's on CUDA, the grouped torch kernel on CPU (smoke)."""
    from pdmesh.models.fused_moe import Tiles, fused_experts
    from pdmesh.models.moe import grouped_experts

    if cpu:
        return lambda x, gu, dn, w, ids, first=0, every=True, tiles=None: grouped_experts(x, gu, dn, w, ids, first)
    return lambda x, gu, dn, w, ids, first=0, every=True, tiles=None: fused_experts(
        x, gu, dn, w, ids, first, every_expert=every, tiles=Tiles(*tiles) if tiles else None)


# ---------------------------------------------------------------------------------------- kernel
def stage_check(shape: dict, sizes: list[int], cpu: bool) -> dict:
    from pdmesh.models.moe import grouped_experts

    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    fused, rows = experts_kernel(cpu), []
    e = shape["experts"]
    for t in sizes:
        x, gu, dn, w, ids = layer_inputs(shape, t, dev, dtype, seed=t)
        for first, count in ((0, e), (e // 2, e // 2)):
            want = grouped_experts(x.float(), gu[first:first + count].float(), dn[first:first + count].float(),
                                   w.float(), ids, first, grouped_mm=False)
            got = fused(x, gu[first:first + count], dn[first:first + count], w, ids, first, count == e)
            err = rel(got, want)
            rows.append({"tokens": t, "experts": f"{first}-{first + count - 1}", "rel_err": err, "ok": err < CHECK_RTOL})
            log(f"check {t} tokens, experts {first}-{first + count - 1}: rel err {err:.2e} {'ok' if err < CHECK_RTOL else 'WRONG'}")
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def stage_kernel(shape: dict, sizes: list[int], cpu: bool, hbm: float, flops: float, clock: Clock) -> list[dict]:
    from pdmesh.models.moe import grouped_experts

    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    fused, t_of, rows = experts_kernel(cpu), timer(cpu), []
    h, i, k = shape["hidden"], shape["width"], shape["top_k"]
    expert_bytes = 3 * h * i * (4 if cpu else 2)
    for t in sizes:
        if not clock.fits(20, f"kernel {t} tokens"):
            rows.append({"tokens": t, "skipped": "time budget"})
            continue
        x, gu, dn, w, ids = layer_inputs(shape, t, dev, dtype, seed=t)
        routed = int(ids.unique().numel())
        mem_floor = (routed * expert_bytes + 2 * x.numel() * x.element_size()) / hbm
        flop_floor = 2 * t * k * 3 * h * i / flops
        row = {"tokens": t, "pairs": t * k, "experts_routed": routed, "floor_memory_us": mem_floor * 1e6,
               "floor_compute_us": flop_floor * 1e6, "floor_us": max(mem_floor, flop_floor) * 1e6}
        row["fused_us"] = t_of(lambda: fused(x, gu, dn, w, ids)) * 1e6
        if not cpu:
            sweep = {}
            for tiles in TILE_SWEEP:
                try:
                    sweep[str(tiles)] = t_of(lambda: fused(x, gu, dn, w, ids, tiles=tiles)) * 1e6
                except Exception as exc:  # noqa: BLE001 - a tile shape the GPU cannot run: recorded
                    sweep[str(tiles)] = repr(exc)[:120]
            timed = {kk: v for kk, v in sweep.items() if isinstance(v, float)}
            row["tile_sweep_us"] = sweep
            if timed:
                row["best_tiles"] = min(timed, key=timed.get)
                row["best_us"] = timed[row["best_tiles"]]
        row["reference_us"] = t_of(lambda: grouped_experts(x, gu, dn, w, ids, 0), iters=3) * 1e6
        row["ratio"] = row["fused_us"] / row["floor_us"]
        log(f"kernel {t} tokens ({routed} experts routed): fused {row['fused_us']:.1f} us, best tiles "
            f"{row.get('best_us', float('nan')):.1f} us {row.get('best_tiles', '')}, reference {row['reference_us']:.1f} us, "
            f"floor {row['floor_us']:.1f} us, ratio {row['ratio']:.2f}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- engines
TINY_MOE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=1024)
"""The shapes --cpu-smoke puts over a Qwen3-MoE preset: a tiny model that splits over 2 ranks both by
expert width and by whole experts."""


def preset_dir(work: Path, preset: str, layers: int, tiny: bool = False) -> str:
    """A model directory holding ``preset``'s config.json cut to its first ``layers`` layers (with
    ``TINY_MOE``'s shapes when ``tiny``), for ``--model DIR --load-format dummy``: dummy weights are
    drawn per parameter name, so its layers are the full preset's first ``layers`` layers."""
    full = PRESETS[preset]["num_hidden_layers"]
    if not 1 <= layers <= full:
        raise SystemExit(f"--layers {layers}: {preset} has {full} layers (1..{full})")
    cfg = dict(PRESETS[preset], num_hidden_layers=layers)
    cfg["mlp_only_layers"] = [i for i in cfg.get("mlp_only_layers", []) if i < layers]
    if tiny:
        cfg.update(TINY_MOE)
    d = work / f"{preset}-{layers}l{'-tiny' if tiny else ''}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def peak_rates(cpu: bool) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, matmul FLOP/s) of this device, measured now."""
    if cpu:
        return hbm_bandwidth(True), 2 * 512 ** 3 / timer(True)(lambda: torch.randn(512, 512) @ torch.randn(512, 512))
    from benchmarks.gpu_bench import matmul_flops

    rates = hbm_bandwidth(False), matmul_flops()
    torch.cuda.empty_cache()  # the copy's 8 GiB back to the device before an engine sizes itself
    return rates


def build(model: str, cpu: bool, batch: int, max_len: int, devices: str = "cuda:0", tp: int = 1, ep: bool = False,
          eager: bool = False, step_tokens: int = 0, kv_blocks: int = 0):
    from pdmesh.engine.engine import LLMEngine
    from pdmesh.testing import engine_config

    cfg = engine_config(model, device="cpu" if cpu else devices, dtype="float32" if cpu else "bfloat16",
                        max_num_seqs=batch, max_model_len=max_len, eager=eager or cpu,
                        max_tokens_step=step_tokens or (4096 if not cpu else 512), tensor_parallel_size=tp, enable_expert_parallel=ep,
                        block_size=16 if cpu else 32,
                        num_kv_blocks=kv_blocks or batch * -(-max_len // (16 if cpu else 32)) + 64)
    return LLMEngine(cfg)


def routed_experts(eng) -> list[int]:
    """Distinct experts each sparse layer routes the next step's tokens to (one eager step)."""
    from pdmesh.models.moe import SparseMoeBlock

    seen: list[int] = []
    blocks = [m for m in eng.model.modules() if isinstance(m, SparseMoeBlock)]
    for m in blocks:
        m.experts_out = (lambda orig: lambda x, w, ids, kernel=None: (seen.append(int(ids.unique().numel())),
                                                                        orig(x, w, ids, kernel))[1])(m.experts_out)
    graphs, eng.runner.graphs = eng.runner.graphs, None
    try:
        eng.step()
    finally:
        eng.runner.graphs = graphs
        for m in blocks:
            del m.experts_out
    return seen


def weight_bytes(eng) -> tuple[int, int]:
    """(bytes of this rank's weights a decode step reads besides the experts (no embedding table:
    a step reads only its rows), bytes of one whole expert (all three projections) on this rank)."""
    from pdmesh.models.moe import FusedExperts

    other = sum(p.numel() * p.element_size() for n, p in eng.model.named_parameters()
                if ".mlp.experts." not in n and "embed_tokens" not in n)
    ex = next(m for m in eng.model.modules() if isinstance(m, FusedExperts))
    one = (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()) * ex.gate_up_proj.element_size()
    return other, one


def fill(eng, label: str, batch: int, ctx: int) -> None:
    from pdmesh.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    vocab = eng.arch.vocab_size
    for i in range(batch):
        eng.add_request(f"{label}-{batch}-{i}", [(i * 131 + j * 7) % min(30000, vocab - 20) + 10 for j in range(ctx)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()


def drain(eng) -> None:
    for s in list(eng.scheduler.running):
        eng.abort(s.request_id)
    while eng.has_work():
        eng.step()


def decode_point(eng, label: str, batch: int, ctx: int, hbm: float, cpu: bool, routed: list[int] | None = None) -> dict:
    """The decode step at ``batch`` x ``ctx`` against its floor.  ``routed``: distinct experts per
    layer, counted on a TP-1 engine at the same batch (TP ranks must replay the same graphs, so a
    TP engine is never stepped eagerly on rank 0 alone)."""
    fill(eng, label, batch, ctx)
    for _ in range(2 if cpu else 5):
        eng.step()
    start = statistics.mean(s.num_tokens for s in eng.scheduler.running)
    step = statistics.median(steady_step(eng, 3 if cpu else 20) for _ in range(3 if cpu else 7))
    mean_ctx = (start + statistics.mean(s.num_tokens for s in eng.scheduler.running)) / 2
    routed = routed_experts(eng) if eng.tp.size == 1 or routed is None else routed
    other, one = weight_bytes(eng)
    kv_tok = eng.pool.layout.head_block_bytes(eng.pool.layout.local_kv_heads) // eng.pool.block_size
    split = eng.model.model.layers[0].mlp.experts.split if eng.arch.is_moe_layer(0) else None
    share = (split.count / split.num_experts) if split is not None else 1.0  # EP: rank 0's experts only
    parts = {"other_bytes": other, "expert_bytes": one, "expert_share": share, "kv_bytes_per_token": kv_tok}
    fl = decode_floor(parts, routed, batch, mean_ctx, hbm)
    drain(eng)
    row = {"label": label, "batch": batch, "context": ctx, "mean_context": mean_ctx, "step_ms": step * 1e3,
           "experts_routed": routed, "experts_routed_per_layer": statistics.mean(routed), **fl,
           "ratio": step * 1e3 / fl["floor_ms"], "tp": eng.tp.size, "cuda_graphs": eng.runner.graphs is not None,
           "floor_parts": parts}
    log(f"{label} decode batch {batch}: step {step * 1e3:.2f} ms, floor {fl['floor_ms']:.2f} ms "
        f"(experts {fl['floor_expert_ms']:.2f} ms, {row['experts_routed_per_layer']:.0f} routed/layer), ratio {row['ratio']:.2f}")
    return row


def decode_floor(parts: dict, routed: list[float], batch: float, mean_ctx: float, hbm: float) -> dict:
    """A decode step's floor on one rank: (its weights besides the experts + the experts its tokens
    are routed to (``routed``: distinct experts per sparse layer; under EP only this rank's share of
    them) + the batch's KV) / copy bandwidth.  ``parts``: other_bytes, expert_bytes (one expert on
    this rank), expert_share (1, or this rank's experts / all under EP), kv_bytes_per_token."""
    experts = sum(routed) * parts["expert_bytes"] * parts["expert_share"]
    kv = batch * mean_ctx * parts["kv_bytes_per_token"]
    total = parts["other_bytes"] + experts + kv
    return {"floor_ms": total / hbm * 1e3, "floor_expert_ms": experts / hbm * 1e3, "floor_kv_ms": kv / hbm * 1e3,
            "floor_other_ms": parts["other_bytes"] / hbm * 1e3}


def prefill_point(eng, label: str, tokens: int, flops: float, cpu: bool) -> dict:
    from pdmesh.engine import SamplingParams

    arch = eng.arch
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_token = arch.num_layers * (h * (q + 2 * kv) + q * h) + arch.num_moe_layers * (
        arch.num_experts * h + arch.num_experts_per_tok * 3 * h * arch.moe_intermediate_size) + \
        (arch.num_layers - arch.num_moe_layers) * 3 * h * arch.intermediate_size
    attn = 2 * arch.num_layers * arch.num_heads * arch.head_dim * tokens * tokens  # causal QK^T + PV
    total = 2 * per_token * tokens + attn + 2 * arch.vocab_size * h  # LM head: the last row only
    times = []
    for i in range(3 if cpu else 6):
        eng.add_request(f"{label}-p{i}", [(i * 17 + j * 13) % min(30000, arch.vocab_size - 20) + 10 for j in range(tokens)],
                        SamplingParams(temperature=0, max_tokens=1))
        if not cpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()
        if not cpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        drain(eng)
    t = statistics.median(times[1:])
    floor = total / flops / eng.tp.size
    log(f"{label} prefill {tokens} tokens: {t * 1e3:.1f} ms, floor {floor * 1e3:.1f} ms, ratio {t / floor:.2f}, "
        f"{total / t / 1e12:.0f} TFLOP/s")
    return {"label": label, "tokens": tokens, "prefill_ms": t * 1e3, "floor_ms": floor * 1e3, "ratio": t / floor,
            "achieved_tflops": total / t / 1e12, "tp": eng.tp.size}


def stage_engine(model: str, cpu: bool, hbm: float, flops: float, clock: Clock, batches: list[int], ctx: int,
                 prompt: int) -> list[dict]:
    if not clock.fits(90 if not cpu else 5, "engine"):
        return [{"skipped": "time budget"}]
    eng = build(model, cpu, max(batches), max(ctx + 512, prompt + 64))
    label, rows = f"{eng.arch.num_layers} layers TP 1", []
    for b in batches:
        if clock.fits(20 + b * ctx / 20000, f"decode batch {b}"):
            rows.append(decode_point(eng, label, b, ctx, hbm, cpu))
    if clock.fits(20, "prefill"):
        rows.append(prefill_point(eng, label, prompt, flops, cpu))
    eng.close()
    _release(eng)
    return rows


def stage_tpep(model: str, cpu: bool, hbm: float, flops: float, clock: Clock, batches: list[int], ctx: int,
               prompt: int) -> list[dict]:
    from benchmarks.gpu_tp import _check_prompts

    rows, ref, routed = [], None, {}
    for label, tp, ep in (("TP 1", 1, False), ("TP 2", 2, False), ("EP 2", 2, True)):
        if not clock.fits(60 if not cpu else 5, label):
            rows.append({"label": label, "skipped": "time budget"})
            continue
        devices = "cpu" if cpu else "cuda:0,1" if tp > 1 else "cuda:0"
        eng = build(model, cpu, max(batches), max(ctx + 512, prompt + 64), devices=devices, tp=tp, ep=ep)
        label = f"{eng.arch.num_layers} layers {label}"
        logits = eng.score(_check_prompts(eng.arch.vocab_size)[0]).float().cpu()
        check = None if ref is None else rel(logits, ref)
        ref = logits if ref is None else ref
        if check is not None:
            log(f"{label} vs TP 1: logits rel diff {check:.2e}")
        if check is not None and check >= 3e-2:
            rows.append({"label": label, "logits_rel_diff": check, "skipped": "logits differ from TP 1"})
        else:
            for b in batches:
                if clock.fits(20 + b * ctx / 20000, f"{label} batch {b}"):
                    row = decode_point(eng, label, b, ctx, hbm, cpu, routed.get(b))
                    routed.setdefault(b, row["experts_routed"])
                    rows.append(dict(row, logits_rel_diff=check))
            if clock.fits(20, f"{label} prefill"):
                rows.append(dict(prefill_point(eng, label, prompt, flops, cpu), logits_rel_diff=check))
        eng.close()
        _release(eng)
    return rows


# ---------------------------------------------------------------------------------------- FlashInfer
def _flashinfer_child(shape: dict, sizes: list[int], q) -> None:
    """FlashInfer's cutlass_fused_moe at each size (compiles its SM90 module on first use): checked
    against the reference (gate/up halves in either order: the one that matches is reported), timed."""
    from flashinfer.fused_moe import cutlass_fused_moe

    from pdmesh.models.moe import grouped_experts

    t_of, rows = timer(False), []
    for t in sizes:
        x, gu, dn, w, ids = layer_inputs(shape, t, torch.device("cuda"), torch.bfloat16, seed=t)
        want = grouped_experts(x.float(), gu.float(), dn.float(), w.float(), ids, 0, grouped_mm=False)
        i = shape["width"]
        row = {"tokens": t}
        for order, fc1 in (("gate,up", gu), ("up,gate", torch.cat([gu[:, i:], gu[:, :i]], 1).contiguous())):
            def run():
                return cutlass_fused_moe(x, ids.to(torch.int32), w.float(), fc1, dn, torch.bfloat16, quant_scales=[])

            t0 = time.monotonic()
            res = run()  # the first call compiles the module
            row.setdefault("first_call_s", time.monotonic() - t0)
            got = res[0] if isinstance(res, (list, tuple)) else res
            err = rel(got, want)
            if err < CHECK_RTOL:
                row.update(order=order, rel_err=err, us=t_of(run) * 1e6)
                break
            row[f"rel_err_{order}"] = err
        rows.append(row)
        q.put(rows)


def stage_flashinfer(shape: dict, sizes: list[int], seconds: float) -> dict:
    import queue

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_flashinfer_child, args=(shape, sizes, q))
    p.start()
    rows: list = []
    deadline = time.monotonic() + seconds
    while p.is_alive() and time.monotonic() < deadline:
        try:
            rows = q.get(timeout=1)
        except queue.Empty:
            pass
    while True:
        try:
            rows = q.get_nowait()
        except queue.Empty:
            break
    if p.is_alive():
        p.kill()
        return {"rows": rows, "error": f"not done within {seconds:.0f} s (compiling?)"}
    p.join()
    for r in rows:
        log(f"flashinfer cutlass_fused_moe {r['tokens']} tokens: {r.get('us', float('nan')):.1f} us, order {r.get('order')}, "
            f"rel err {r.get('rel_err', float('nan')):.2e}")
    return {"rows": rows, **({"error": f"exit code {p.exitcode}"} if p.exitcode else {})}


# ---------------------------------------------------------------------------------------- report / main
def report(out: Path) -> None:
    path = out / "moe.json"
    if not path.is_file():
        print("MOE no moe.json")
        return
    doc = json.loads(path.read_text())
    if doc.get("refused"):
        print("MOE NOT MEASURED: " + doc["refused"])
    chk = doc.get("check") or {}
    if chk:
        print("MOE CHECK " + ("ok" if chk["ok"] else "FAILED") + " max rel err "
              f"{max(r['rel_err'] for r in chk['rows']):.2e}")
    for r in doc.get("kernel", []):
        if "fused_us" in r:
            print(f"MOE KERNEL {r['tokens']:>5} tok: fused {r['fused_us']:.1f} us (best {r.get('best_us', float('nan')):.1f} "
                  f"{r.get('best_tiles', '')}), reference {r['reference_us']:.1f} us, floor {r['floor_us']:.1f} us, "
                  f"ratio {r['ratio']:.2f}")
    for r in doc.get("engine", []) + doc.get("tpep", []):
        if "step_ms" in r:
            print(f"MOE DECODE {r['label']} batch {r['batch']}: step {r['step_ms']:.2f} ms, floor {r['floor_ms']:.2f} ms, "
                  f"ratio {r['ratio']:.2f}")
        elif "prefill_ms" in r:
            print(f"MOE PREFILL {r['label']} {r['tokens']} tok: {r['prefill_ms']:.1f} ms, floor {r['floor_ms']:.1f} ms, "
                  f"ratio {r['ratio']:.2f}, {r['achieved_tflops']:.0f} TFLOP/s")
        else:
            print(f"MOE {r.get('label', '')} skipped: {r.get('skipped')}")
    fi = doc.get("flashinfer")
    if fi:
        for r in fi.get("rows", []):
            print(f"MOE FLASHINFER {r['tokens']:>5} tok: {r.get('us', float('nan')):.1f} us, order {r.get('order')}")
        if fi.get("error"):
            print(f"MOE FLASHINFER error: {fi['error']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="directory for moe.json")
    ap.add_argument("stages", nargs="*", default=["check", "kernel", "engine", "tpep"],
                    help="check, kernel, engine, tpep, flashinfer")
    ap.add_argument("--budget", type=float, default=330, help="seconds this run may take")
    ap.add_argument("--layers", type=int, default=48, help="layers of qwen3-30b-a3b in the engine stage (of 48)")
    ap.add_argument("--tp-layers", type=int, default=12, help="layers of qwen3-30b-a3b in the tpep stage")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same code on CPU (a tiny Qwen3-MoE, gloo)")
    ap.add_argument("--report", action="store_true", help="print the table of what OUT holds, and stop")
    a = ap.parse_args()
    out = Path(a.out)
    if a.report:
        return report(out)
    out.mkdir(parents=True, exist_ok=True)
    clock, cpu = Clock(a.budget), a.cpu_smoke
    arch = PRESETS[PRESET]
    shape = dict(experts=arch["num_experts"], hidden=arch["hidden_size"], width=arch["moe_intermediate_size"],
                 top_k=arch["num_experts_per_tok"])
    sizes, batches, ctx, prompt = [1, 64, 3500], [1, 64], 2048, 3500
    if cpu:
        shape, sizes, batches, ctx, prompt = dict(experts=8, hidden=64, width=32, top_k=2), [1, 8, 64], [1, 4], 64, 96
    doc: dict = {"stages": a.stages, "cpu_smoke": cpu, "model": PRESET, "layers": a.layers, "tp_layers": a.tp_layers,
                 "shape": shape}
    if "check" in a.stages:
        doc["check"] = stage_check(shape, sizes, cpu)
        save(out, "moe.json", doc)
        if not doc["check"]["ok"]:
            doc["refused"] = "the fused layer differs from the reference: nothing measured"
            log("NOT MEASURED: " + doc["refused"])
            save(out, "moe.json", doc)
            sys.exit(2)
    hbm, flops = peak_rates(cpu)
    doc.update(hbm_bytes_per_s=hbm, matmul_flops=flops)
    log(f"copy bandwidth {hbm / 1e12:.3f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s")
    work = Path(tempfile.mkdtemp())
    if "kernel" in a.stages:
        doc["kernel"] = stage_kernel(shape, sizes, cpu, hbm, flops, clock)
        save(out, "moe.json", doc)
    if "engine" in a.stages:
        doc["engine"] = stage_engine(preset_dir(work, PRESET, a.layers, cpu), cpu, hbm, flops, clock, batches, ctx, prompt)
        save(out, "moe.json", doc)
    if "tpep" in a.stages:
        if cpu or torch.cuda.device_count() >= 2:
            doc["tpep"] = stage_tpep(preset_dir(work, PRESET, a.tp_layers, cpu), cpu, hbm, flops, clock, batches, ctx, prompt)
        else:
            doc["tpep"] = [{"label": "TP 2 / EP 2", "skipped": "needs 2 GPUs"}]
        save(out, "moe.json", doc)
    if "flashinfer" in a.stages and not cpu:
        doc["flashinfer"] = stage_flashinfer(shape, sizes, max(0.0, clock.left()))
        save(out, "moe.json", doc)
    log(f"done; {clock.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
