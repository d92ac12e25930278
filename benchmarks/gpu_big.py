"""Qwen3-235B-A22B served disaggregated on N GPUs (issue 23), through ``pdmesh up`` and the gateway, in
one command (``benchmarks/gpu_big.sh`` runs it with the GPU machine's environment):

    python3 benchmarks/gpu_big.py --out $OUT --gpus 8 --budget 540                 # full size, 8 GPUs
    python3 benchmarks/gpu_big.py --out $OUT --gpus 2 --tp 2 --layers 8 --budget 540  # cut preset, 2 GPUs
    python3 benchmarks/gpu_big.py --out /tmp/x --cpu-smoke                         # the same orchestration on CPU

The ``qwen3-235b-a22b`` dummy preset (bf16), or its first ``--layers K`` of 94 layers (a model directory
holding the preset's config.json with ``num_hidden_layers`` = K: ``gpu_moe.preset_dir``).  Stages, in
order, each skipped when what is left of ``--budget`` cannot hold it (said so in big.json):

engines  one engine of the served layout per mode, each in a child process: TP ``--tp`` splitting every
         expert's width, and (``--ep auto``) TP with --enable-expert-parallel (whole experts per rank);
         on disjoint GPU groups side by side when 2 x TP <= N, else one after the other.  Each gives
         the greedy tokens of the check prompts (one prompt at a time, as the mesh is checked), its
         logits after the first, a decode step at batch 16 and 64 (2k context, CUDA graphs) against
         its floor (``gpu_moe.decode_point``: weights besides the experts + the experts routed to +
         the batch's KV, at the copy bandwidth measured in that process) and a prefill of 3,500 tokens.
         EP serves when its logits are within 3e-2 of TP's and its batch-64 step is faster.
disagg   ``pdmesh up``: 1 prefill worker on GPUs 0..TP-1 and 1 decode worker on the next TP GPUs (both
         on GPUs 0..N-1 when TP = N), KV over cuda_ipc (the default transport on one host).  Before any
         load, greedy tokens of the check prompts sent one at a time through the gateway must equal the
         engine's, and each must have been pulled (decode worker's log); then ``pdmesh bench`` at each
         --shapes x --concurrency (one wave: as many prompts as the concurrency, ``ignore_eos``):
         TTFT/TPOT/ITL percentiles, goodput under TPOT 20 and 35 ms (from every request's figures),
         output tokens/s per GPU, the decode worker's own mean decode step (its Prometheus series over
         the point) against the floor at its mean batch and context (expected distinct experts for
         that batch), the KV pulls' times; every KV block free afterwards.
colocated the same N GPUs as two colocated replicas of TP ``--tp`` (``--prefill 0 --decode 0 --colocated
         2``), checked and measured the same way, for the comparison.
disagg-nixl the disaggregated mesh with ``--kv-transports nixl`` when NIXL imports (else skipped).

Memory: bf16 weights of 235B are 470 GB, 109.5 GiB per rank at TP 4; the KV a rank can hold at
``--gpu-memory-utilization`` against what the largest load point needs is in big.json
(``memory_plan``; each worker's real KV capacity under ``layouts.*.kv_capacity_tokens``).  FP8 weights
(issue 22) are not merged: bf16 is what runs.  Results: OUT/big.json (``--report`` prints the table),
OUT/work/ (bench result files with every request, the meshes' logs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_tp import Clock, log, save  # noqa: E402

MODEL = "qwen3-235b-a22b"
CHECK = ((3500, 1), (1000, 2), (200, 3))
"""(prompt tokens, salt) of the prompts whose greedy tokens are checked before any load."""
CHECK_OUT = 32
LOGITS_RTOL = 3e-2
SLOS_MS = (20.0, 35.0)
"""TPOT limits of the goodput figures."""
ROLE_DECODE, ROLE_BOTH = 2, 3
BLOCK = 32
"""Tokens per KV block (the workers' default)."""


class Setup:
    """What one run serves and where (from the flags; --cpu-smoke shrinks it)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.cpu = a.cpu_smoke
        self.n = 4 if self.cpu else a.gpus
        self.tp = a.tp or max(1, self.n // 2)
        if not (2 * self.tp <= self.n or self.tp == self.n) or self.n < 2:
            raise SystemExit(f"--tp {self.tp} on {self.n} GPUs: two workers need 2 x TP <= N (own GPUs) or TP = N (shared)")
        self.layers = 2 if self.cpu else a.layers
        self.shapes = ["48:8", "32:8"] if self.cpu else a.shapes
        self.concurrency = [2, 4] if self.cpu else a.concurrency
        self.check = [(40, 1), (24, 2), (12, 3)] if self.cpu else list(CHECK)
        self.check_out = 8 if self.cpu else CHECK_OUT
        self.batches = sorted({min(self.concurrency), max(self.concurrency)})
        self.ctx, self.prefill_tokens = (32, 48) if self.cpu else (2048, 3500)
        self.max_len = 512 if self.cpu else 8192  # the engines' decode points ask for 400 tokens
        groups = [list(range(self.tp)), list(range(self.tp, 2 * self.tp))] if 2 * self.tp <= self.n else [list(range(self.n))] * 2
        self.groups = [",".join(map(str, g)) for g in groups]
        self.shared = self.groups[0] == self.groups[1]

    def devices(self, i: int) -> str:
        return "cpu" if self.cpu else "cuda:" + self.groups[i]


def expected_routed(arch, batch: float) -> list[float]:
    """Distinct experts a sparse layer reads for ``batch`` tokens of uniform routing, per sparse layer."""
    e, k = arch.num_experts, arch.num_experts_per_tok
    return [e * (1 - (1 - k / e) ** batch)] * arch.num_moe_layers


# ---------------------------------------------------------------------------------------- engines
def engine_child(spec: dict) -> dict:
    """In a child process: one engine (``spec``: model, devices, tp, ep, ...): check tokens, logits
    (saved to spec['logits']), decode steps against their floors, a prefill."""
    import torch

    from benchmarks.gpu_moe import build, decode_point, peak_rates, prefill_point
    from benchmarks.gpu_tp import _greedy

    cpu = spec["cpu"]
    if not cpu:  # the rates of this engine's first GPU (another engine may run on GPU 0)
        torch.cuda.set_device(int(spec["devices"].split(":")[1].split(",")[0]))
    hbm, flops = peak_rates(cpu)
    t0 = time.monotonic()
    eng = build(spec["model"], cpu, max(spec["batches"]), spec["max_len"], devices=spec["devices"], tp=spec["tp"],
                ep=spec["ep"], step_tokens=spec["step_tokens"], kv_blocks=spec["kv_blocks"])
    out: dict = {"mode": spec["mode"], "tp": spec["tp"], "ep": spec["ep"], "devices": spec["devices"],
                 "build_s": time.monotonic() - t0, "hbm_bytes_per_s": hbm, "matmul_flops": flops,
                 "device_name": "cpu" if cpu else torch.cuda.get_device_name(eng.device)}
    out["tokens"] = [_greedy(eng, [p], spec["check_out"])[0] for p in spec["prompts"]]
    torch.save(eng.score(spec["prompts"][0]).float().cpu(), spec["logits"])
    label = f"{eng.arch.num_layers} layers {spec['mode'].upper()} {spec['tp']}"
    routed = {b: expected_routed(eng.arch, b) for b in spec["batches"]} if spec["tp"] > 1 else {}
    out["decode"] = [decode_point(eng, label, b, spec["ctx"], hbm, cpu, routed.get(b)) for b in spec["batches"]]
    out["prefill"] = prefill_point(eng, label, spec["prefill_tokens"], flops, cpu)
    if not cpu:  # what rank 0's kernels spend a decode step of the largest batch on
        from benchmarks.gpu_bench import kernel_profile
        from benchmarks.gpu_moe import drain, fill

        fill(eng, f"{label} profile", spec["batches"][-1], spec["ctx"])
        for _ in range(5):
            eng.step()
        out["profile"] = dict(kernel_profile(eng, f"{label} batch {spec['batches'][-1]}", 10, top=12),
                              batch=spec["batches"][-1])
        drain(eng)
    eng.close()
    return out


def stage_engines(s: Setup, model: str, prompts: list[list[int]], ep_flag: str, clock: Clock, work: Path) -> dict:
    """Both modes' engines (children; side by side on disjoint GPU groups), compared; the mode that serves."""
    import torch

    modes = {"auto": [("tp", False), ("ep", True)], "on": [("ep", True)], "off": [("tp", False)]}[ep_flag]
    if s.tp == 1:
        modes = [("tp", False)]
    side_by_side = not s.cpu and not s.shared and len(modes) == 2
    procs, res = {}, {}
    longest = max(s.ctx + 512, max(len(p) for p in prompts) + 64)  # tokens of a sequence in the engine
    for i, (mode, ep) in enumerate(modes):
        spec = {"mode": mode, "ep": ep, "cpu": s.cpu, "model": model, "tp": s.tp, "batches": s.batches, "ctx": s.ctx,
                "devices": s.devices(i if side_by_side else 0), "prompts": prompts, "check_out": s.check_out,
                "max_len": s.max_len, "step_tokens": 2048,  # the workers' max-model-len and default step budget
                "kv_blocks": max(s.batches) * -(-longest // (16 if s.cpu else BLOCK)) + 64,
                "prefill_tokens": s.prefill_tokens, "logits": str(work / f"logits-{mode}.pt")}
        cmd = [sys.executable, __file__, "--engine-child", json.dumps(spec)]
        procs[mode] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(work / f"engine-{mode}.log", "w"), text=True)
        if not side_by_side:
            res[mode] = _collect(procs.pop(mode), mode, clock, work)
    for mode, p in procs.items():
        res[mode] = _collect(p, mode, clock, work)
    doc: dict = {"modes": res, "side_by_side": side_by_side}
    ok = {m: r for m, r in res.items() if "tokens" in r}
    if "tp" in ok and "ep" in ok:
        a, b = (torch.load(work / f"logits-{m}.pt") for m in ("tp", "ep"))
        ok["ep"]["logits_rel_diff_vs_tp"] = diff = ((b - a).norm() / a.norm()).item()
        step = {m: ok[m]["decode"][-1]["step_ms"] for m in ("tp", "ep")}
        ep = diff < LOGITS_RTOL and step["ep"] < step["tp"]
        doc["why"] = (f"batch {s.batches[-1]} decode step: EP {step['ep']:.2f} ms, TP {step['tp']:.2f} ms; "
                      f"EP logits vs TP rel diff {diff:.1e}")
    else:
        ep = "ep" in ok and "tp" not in ok
        doc["why"] = f"--ep {ep_flag}" + (" (TP 1: no expert parallelism)" if s.tp == 1 else "") + (
            f"; failed: {sorted(set(res) - set(ok))}" if len(ok) < len(res) else "")
    doc["serve"] = "ep" if ep else "tp"
    if doc["serve"] not in ok:
        return dict(doc, error=f"the {doc['serve']} engine failed: nothing to check the meshes against")
    log(f"engines: serving with {'expert' if ep else 'tensor'} parallelism ({doc['why']})")
    return doc


def _collect(p: subprocess.Popen, mode: str, clock: Clock, work: Path) -> dict:
    try:
        stdout, _ = p.communicate(timeout=max(10.0, clock.left()))
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return {"skipped": "time budget (the engine did not finish)"}
    line = next((x for x in stdout.splitlines() if x.startswith("ENGINE ")), None)
    if p.returncode != 0 or line is None:
        return {"error": f"exit {p.returncode}: " + (work / f"engine-{mode}.log").read_text(errors="replace")[-3000:]}
    r = json.loads(line[7:])
    log(f"engine {mode}: built in {r['build_s']:.0f} s on {r['devices']}; " + "; ".join(
        f"batch {d['batch']} step {d['step_ms']:.2f} ms floor {d['floor_ms']:.2f} ms" for d in r["decode"]))
    return r


# ---------------------------------------------------------------------------------------- meshes
def up_flags(layout: str, s: Setup, model: str, tok: str, ep: bool, util: float) -> list[str]:
    """``pdmesh up`` flags of a layout: 'disagg', 'disagg-nixl' or 'colocated'."""
    flags = ["--model", model, "--load-format", "dummy", "--tokenizer", tok, "--served-model-name", MODEL,
             "--max-model-len", str(s.max_len), *(["--enable-expert-parallel"] if ep else [])]
    worker = ["--kv-transports", "nixl"] if layout == "disagg-nixl" else []
    if s.cpu:
        flags += ["--dtype", "float32"]
        worker += ["--cpu-threads", "1", "--kv-cache-memory", str(256 << 20)]
    else:
        flags += ["--gpu-memory-utilization", str(util)]
    seqs = f"--max-num-seqs {max(s.concurrency)}"
    if layout.startswith("disagg"):
        flags += ["--prefill", "1", "--decode", "1", "--prefill-tensor-parallel-size", str(s.tp),
                  "--decode-tensor-parallel-size", str(s.tp), "--decode-args", seqs]
        if not s.cpu:
            flags += ["--prefill-devices", s.groups[0], "--decode-devices", s.groups[1]]
    else:
        flags += ["--prefill", "0", "--decode", "0", "--colocated", "2", "--colocated-tensor-parallel-size", str(s.tp),
                  "--colocated-args", seqs]
        if not s.cpu:
            flags += ["--colocated-devices", s.groups[0] if s.shared else f"{s.groups[0]},{s.groups[1]}"]
    return flags + (["--worker-args", " ".join(worker)] if worker else [])


class Point:
    """Estimates a load point's seconds from the engine's decode step and prefill rate, scaled by
    what earlier points took against their estimate."""

    def __init__(self, engine: dict, cpu: bool) -> None:
        self.step_s = engine["decode"][-1]["step_ms"] / 1e3
        self.prefill_tok_s = engine["prefill"]["tokens"] / (engine["prefill"]["prefill_ms"] / 1e3)
        self.scale, self.slack = 1.3, 5.0 if cpu else 15.0

    def raw(self, inp: int, out: int, c: int) -> float:
        return out * self.step_s + c * inp / self.prefill_tok_s

    def estimate(self, inp: int, out: int, c: int) -> float:
        return self.scale * self.raw(inp, out, c) + self.slack

    def took(self, inp: int, out: int, c: int, seconds: float) -> None:
        self.scale = max(self.scale, 1.1 * (seconds - self.slack) / max(self.raw(inp, out, c), 1e-6))


@dataclass
class Run:
    """What every mesh of a run shares: the setup, the model, the check prompts and their reference
    tokens, the engines' results, the clock, and big.json (``persist`` writes it)."""

    s: Setup
    a: argparse.Namespace
    work: Path
    model: str
    arch: Any
    prompts: list[list[int]]
    refs: list[list[int]]
    engines: dict
    clock: Clock
    doc: dict
    out: Path

    def persist(self) -> None:
        save(self.out, "big.json", self.doc)


def measure_point(r: Run, up, layout: str, decoders: dict[str, str], inp: int, out: int, c: int, n: int) -> dict:
    """One ``pdmesh bench`` load point (``n`` prompts of ``inp`` tokens, ``out`` out, ``c`` at a time)
    with the decode workers' own step times over it (``decoders``: name -> metrics URL)."""
    from benchmarks.gpu_moe import decode_floor
    from benchmarks.gpu_pd_report import goodput
    from benchmarks.gpu_serving import worker_window
    from benchmarks.gpu_up import bench, pull_stats
    from tests.meshproc import scrape

    eng = r.engines["modes"][r.engines["serve"]]
    path = r.work / f"bench-{layout}-{inp}_{out}-c{c}.json"
    before = {w: scrape(u) for w, u in decoders.items()}
    mark, t0 = len(up.text()), time.monotonic()
    m = bench(up.base, r.work / "tok", c, n, inp, out, path, num_gpus=r.s.n)
    wall = time.monotonic() - t0
    wk = worker_window(list(decoders), before, {w: scrape(u) for w, u in decoders.items()})
    recs = json.loads(path.read_text())["points"][0]["requests"]
    keep = ("completed", "failed", "duration_s", "request_throughput", "output_throughput", "output_throughput_per_gpu")
    row = {"shape": f"{inp}:{out}", "concurrency": c, "prompts": n, "wall_s": round(wall, 1), **{k: m[k] for k in keep},
           **{k: v for k, v in m.items() if k.endswith(("_ttft_ms", "_tpot_ms", "_itl_ms"))},
           **{f"goodput_tpot{slo:g}_req_s": goodput(recs, {"tpot_ms": slo}, m["duration_s"]) for slo in SLOS_MS},
           "worker": {k: wk[k] for k in ("decode_steps", "mean_decode_step_ms", "decode_step_tokens", "mixed_steps",
                                         "token_weighted_step_ms", "mean_kv_transfer_ms")}}
    if wk["decode_steps"]:
        batch = wk["decode_step_tokens"] / wk["decode_steps"]
        fl = decode_floor(eng["decode"][-1]["floor_parts"], expected_routed(r.arch, batch), batch, inp + out / 2,
                          eng["hbm_bytes_per_s"])
        row["decode_step_vs_floor"] = dict(fl, mean_batch=batch, mean_context=inp + out / 2,
                                           ratio=(wk["mean_decode_step_ms"] or 0.0) / fl["floor_ms"])
    if layout.startswith("disagg"):
        row["pull_ms"] = pull_stats(up.text(), mark)
    log(f"{layout} {inp}:{out} c={c}: {m['output_throughput_per_gpu']:.0f} tok/s/GPU, TTFT p50 {m['median_ttft_ms']:.0f} "
        f"ms, TPOT p50 {m['median_tpot_ms']:.2f} ms, goodput TPOT 20/35 {row['goodput_tpot20_req_s']:.2f}/"
        f"{row['goodput_tpot35_req_s']:.2f} req/s, decode step {wk['mean_decode_step_ms'] or 0:.2f} ms "
        f"(floor ratio {row.get('decode_step_vs_floor', {}).get('ratio', float('nan')):.2f}), failed {m['failed']:.0f}")
    return row


def run_layout(r: Run, layout: str, res: dict, ready_s: float = 0.0) -> None:
    """Start the layout's mesh, check its tokens, measure every load point that fits (into ``res``,
    written to big.json after each), stop it.  ``ready_s``: how long an earlier mesh took to start
    (0: estimated from the engine's build)."""
    from benchmarks.gpu_up import Up, complete
    from tests.meshproc import list_workers, wait_idle

    s, clock, eng = r.s, r.clock, r.engines["modes"][r.engines["serve"]]
    est_start = 1.1 * ready_s or 1.3 * eng["build_s"] + (20 if s.cpu else 60)
    points = Point(eng, s.cpu)
    inp0, out0 = (int(x) for x in s.shapes[0].split(":"))
    res.update(layout=layout, points=[])
    if not clock.fits(est_start + points.estimate(inp0, out0, s.concurrency[0]), f"{layout} mesh"):
        res["skipped"] = f"time budget ({clock.left():.0f} s left, start + first point ~{est_start:.0f} s+)"
        return
    res["flags"] = up_flags(layout, s, r.model, str(r.work / "tok"), r.engines["serve"] == "ep", r.a.gpu_memory_utilization)
    up = Up(r.work / f"mesh-{layout}.log", res["flags"])
    try:
        res["ready_s"] = round(up.wait_up(max(30.0, clock.left())), 1)
        log(f"{layout}: up in {res['ready_s']} s")
        got = [complete(up.base, p, s.check_out)[2] for p in r.prompts]
        res["tokens_equal_engine"] = [g == want for g, want in zip(got, r.refs)]
        if layout.startswith("disagg"):
            via = "nixl" if layout == "disagg-nixl" else "grpc" if s.cpu else "cuda_ipc"
            res["check_pulls"] = pulled = up.text().count(f" via {via} in ")
            if pulled < len(r.prompts) or "KV pull via" in up.text():
                res["skipped"] = (f"{pulled} pulls via {via} logged for {len(r.prompts)} prompts, or a failed pull "
                                  "(recomputed KV: right tokens, wrong figures): not measured")
                return
        if not all(res["tokens_equal_engine"]):
            res["skipped"] = "tokens differ from the engine's: not measured"
            return
        log(f"{layout}: tokens equal to the engine's for {len(r.prompts)} prompts")
        ws = list_workers(up.scheduler)
        res["kv_capacity_tokens"] = {w.info.worker_id: w.load.total_blocks * BLOCK for w in ws}
        decoders = {w.info.worker_id: f"http://127.0.0.1:{w.info.metrics_port}/metrics" for w in ws
                    if w.info.role in (ROLE_DECODE, ROLE_BOTH)}
        for shape in s.shapes:
            inp, out = (int(x) for x in shape.split(":"))
            for c in s.concurrency:
                est = points.estimate(inp, out, c)
                if not clock.fits(est + 20, f"{layout} {shape} c={c}"):
                    res["points"].append({"shape": shape, "concurrency": c, "skipped": f"time budget (~{est:.0f} s)"})
                    continue
                n = max(c, round(c * r.a.prompts_per_concurrency))
                row = measure_point(r, up, layout, decoders, inp, out, c, n)
                points.took(inp, out, c, row["wall_s"])
                res["points"].append(row)
                r.persist()
        wait_idle(up.scheduler, timeout=60, expect=len(ws))  # raises unless every KV block is free again
        res["kv_all_free_after"] = True
    except SystemExit:
        res["error"] = "stopped by SIGTERM (the command's time limit) while running"
        raise
    except Exception as exc:  # noqa: BLE001 - recorded; the next layout still runs
        res["error"] = repr(exc)[:3000]
        log(f"{layout}: {exc!r}"[:3000])
    finally:
        res["stop_rc"] = up.stop()
        r.persist()


# ---------------------------------------------------------------------------------------- report / main
def memory_plan(s: Setup, arch, util: float) -> dict:
    """What a rank holds (weights, KV per token) and whether the KV left fits the largest load point."""
    from pdmesh.kv.shards import local_kv_heads
    from pdmesh.placement import WORKING_RESERVE_BYTES, visible_gpu_memory

    dtype_bytes = 4 if s.cpu else 2
    weights = arch.num_parameters() * dtype_bytes / s.tp
    kv_tok = 2 * arch.num_layers * local_kv_heads(arch.num_kv_heads, s.tp) * arch.head_dim * dtype_bytes
    need = max(s.concurrency) * max(sum(int(x) for x in sh.split(":")) for sh in s.shapes)
    plan = {"dtype": "float32" if s.cpu else "bfloat16", "weights_per_rank_gib": weights / 2**30,
            "kv_bytes_per_token_per_rank": kv_tok, "kv_tokens_needed_at_max_concurrency": need}
    gpus = [] if s.cpu else visible_gpu_memory()
    if gpus:
        share = util / (2 if s.shared else 1)
        free = gpus[0] * share - weights - WORKING_RESERVE_BYTES
        plan.update(gpu_gib=gpus[0] / 2**30, share_of_gpu=share, kv_gib_per_rank=free / 2**30,
                    kv_tokens_per_worker=int(free // kv_tok), enough=free >= need * kv_tok)
        if not plan["enough"]:
            log(f"bf16 leaves KV for {plan['kv_tokens_per_worker']} tokens per worker, the largest point needs {need}: "
                "it will preempt (fp8 weights, issue 22, are not merged)")
    return plan


def report(out: Path) -> None:
    path = out / "big.json"
    if not path.is_file():
        print("BIG no big.json")
        return
    doc = json.loads(path.read_text())
    print(f"BIG {doc['model']} {doc['layers']}/94 layers, {doc['gpus']} GPUs, TP {doc['tp']}, {doc['date']}, "
          f"commit {doc.get('commit') or '?'}; memory {json.dumps(doc.get('memory_plan', {}))}")
    eng = doc.get("engines", {})
    for m, r in eng.get("modes", {}).items():
        for d in r.get("decode", []):
            print(f"BIG ENGINE {m.upper()} batch {d['batch']}: step {d['step_ms']:.2f} ms, floor {d['floor_ms']:.2f} ms "
                  f"(experts {d['floor_expert_ms']:.2f}, KV {d['floor_kv_ms']:.2f}, other {d['floor_other_ms']:.2f}), "
                  f"ratio {d['ratio']:.2f}")
        prof = r.get("profile")
        if prof:
            print(f"BIG PROFILE {m.upper()} batch {prof['batch']} (rank 0): GPU busy {prof.get('gpu_busy_ms_per_step', 0):.2f} "
                  f"of {prof.get('gpu_span_ms_per_step', 0):.2f} ms/step; top: " + "; ".join(
                      f"{k[0][:50]} {k[1]:.0f} us" for k in prof["top_kernels"][:6]))
        if "prefill" in r:
            p = r["prefill"]
            print(f"BIG ENGINE {m.upper()} prefill {p['tokens']}: {p['prefill_ms']:.1f} ms, ratio {p['ratio']:.2f}")
        if "tokens" not in r:
            print(f"BIG ENGINE {m.upper()}: {r.get('skipped') or r.get('error', '')[:300]}")
    if eng:
        print(f"BIG SERVE {eng.get('serve')}: {eng.get('why')}")
    by: dict = {}
    for name, lay in doc.get("layouts", {}).items():
        head = f"BIG {name}: ready {lay.get('ready_s')} s, tokens {lay.get('tokens_equal_engine')}"
        print(head + "".join(f", {k} {lay[k]}" for k in ("skipped", "error", "kv_capacity_tokens") if k in lay))
        for p in lay.get("points", []):
            if "skipped" in p:
                print(f"BIG {name} {p['shape']} c={p['concurrency']}: skipped, {p['skipped']}")
                continue
            by[(name, p["shape"], p["concurrency"])] = p
            fl = p.get("decode_step_vs_floor", {})
            print(f"BIG {name} {p['shape']} c={p['concurrency']}: {p['output_throughput_per_gpu']:.0f} tok/s/GPU, "
                  f"TTFT p50/p99 {p['median_ttft_ms']:.0f}/{p['p99_ttft_ms']:.0f} ms, TPOT p50/p99 "
                  f"{p['median_tpot_ms']:.2f}/{p['p99_tpot_ms']:.2f} ms, ITL p50/p99 {p['median_itl_ms']:.2f}/"
                  f"{p['p99_itl_ms']:.2f} ms, goodput TPOT20/35 {p['goodput_tpot20_req_s']:.2f}/"
                  f"{p['goodput_tpot35_req_s']:.2f} req/s, step/floor {fl.get('ratio', float('nan')):.2f}, "
                  f"failed {p['failed']:.0f}")
    for (name, shape, c), p in by.items():
        col = by.get(("colocated", shape, c))
        if name == "disagg" and col and col["output_throughput_per_gpu"]:
            print(f"BIG disagg/colocated {shape} c={c}: tok/s {p['output_throughput_per_gpu'] / col['output_throughput_per_gpu']:.2f}x, "
                  f"TPOT p50 {p['median_tpot_ms'] / col['median_tpot_ms']:.2f}x, TTFT p50 {p['median_ttft_ms'] / col['median_ttft_ms']:.2f}x")
    for k in doc.get("skipped", []):
        print(f"BIG skipped: {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory for big.json and work/")
    ap.add_argument("--gpus", type=int, default=8, help="N: GPUs 0..N-1 of this host")
    ap.add_argument("--tp", type=int, default=0, help="ranks per worker (default N/2: each worker on its own GPUs; "
                    "N: both workers on all N GPUs, half the memory each)")
    ap.add_argument("--layers", type=int, default=94, help="layers of qwen3-235b-a22b served (of 94)")
    ap.add_argument("--ep", choices=("auto", "on", "off"), default="auto",
                    help="--enable-expert-parallel: auto (measure both, serve the faster), on, off")
    ap.add_argument("--layouts", nargs="+", default=["disagg", "colocated", "disagg-nixl"],
                    choices=("disagg", "colocated", "disagg-nixl"), help="meshes to run, in this order")
    ap.add_argument("--shapes", nargs="+", default=["3500:1500", "2500:1500"], help="INPUT:OUTPUT tokens")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--prompts-per-concurrency", type=float, default=1.0, help="prompts of a point: this x concurrency")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.93)
    ap.add_argument("--budget", type=float, default=540, help="seconds this run may take")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same orchestration on CPU: a tiny Qwen3-MoE, gloo TP 2")
    ap.add_argument("--report", action="store_true", help="print the table of what OUT holds, and stop")
    ap.add_argument("--engine-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.engine_child:
        print("ENGINE " + json.dumps(engine_child(json.loads(a.engine_child))), flush=True)
        return
    if not a.out:
        ap.error("--out is required")
    out = Path(a.out)
    if a.report:
        return report(out)
    # SIGTERM (the command's time limit) unwinds: a running mesh is stopped (pdmesh up runs in a
    # session of its own and would outlive this process, holding the GPUs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from benchmarks.gpu_moe import preset_dir
    from benchmarks.gpu_up import ids_of, prompt
    from benchmarks.synthetic_tokenizer import write as write_tokenizer
    from pdmesh.models.arch import arch_from_hf_config, load_hf_config
    from pdmesh.tokenizer import Tokenizer

    clock, s = Clock(a.budget), Setup(a)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model = preset_dir(work, MODEL, s.layers, tiny=s.cpu)
    arch = arch_from_hf_config(load_hf_config(model))
    tok = Tokenizer(str(write_tokenizer(arch.vocab_size, work / "tok")))
    prompts = [prompt(n, salt, arch.vocab_size) for n, salt in s.check]
    doc: dict = {"issue": 23, "model": MODEL, "layers": s.layers, "gpus": s.n, "tp": s.tp, "cpu_smoke": s.cpu,
                 "placement": f"prefill GPUs {s.groups[0]}, decode GPUs {s.groups[1]}", "shapes": s.shapes,
                 "concurrency": s.concurrency, "budget_s": a.budget, "commit": os.environ.get("PDMESH_COMMIT", ""),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python3 benchmarks/gpu_big.py " + " ".join(sys.argv[1:]), "skipped": [], "layouts": {},
                 "memory_plan": memory_plan(s, arch, a.gpu_memory_utilization), "quantization": "none (bf16; fp8 not merged)"}
    save(out, "big.json", doc)
    est = (30 if s.cpu else 60 + 1.2 * s.layers) * (1 if s.cpu or not s.shared else 2)
    if not clock.fits(est, "engines"):
        doc["skipped"].append("everything: the engines (the tokens' reference) do not fit the budget")
        return save(out, "big.json", doc)
    doc["engines"] = engines = stage_engines(s, model, prompts, a.ep, clock, work)
    save(out, "big.json", doc)
    if "error" in engines:
        log("NOT MEASURED: " + engines["error"])
        doc["skipped"].append("every mesh: " + engines["error"])
        return save(out, "big.json", doc)
    doc["machine"] = f"{s.n} x {engines['modes'][engines['serve']]['device_name']}"
    refs = [ids_of(tok.decode(ids)) for ids in engines["modes"][engines["serve"]]["tokens"]]
    run = Run(s, a, work, model, arch, prompts, refs, engines, clock, doc, out)
    from pdmesh.transport.nixl import nixl_available

    for layout in a.layouts:
        ready = max([x.get("ready_s", 0.0) for x in doc["layouts"].values()], default=0.0)
        doc["layouts"][layout] = lay = {}
        if layout == "disagg-nixl" and not nixl_available():
            lay["skipped"] = "NIXL is not installed (nixl-cu13 on PYTHONPATH, e.g. .gpu-site)"
        else:
            run_layout(run, layout, lay, ready)
        doc["skipped"] += [f"{layout}: {lay['skipped']}"] if "skipped" in lay else []
        doc["skipped"] += [f"{layout} {p['shape']} c={p['concurrency']}: {p['skipped']}" for p in lay.get("points", [])
                           if "skipped" in p]
        run.persist()
    doc["left_s"] = round(clock.left())
    save(out, "big.json", doc)
    log(f"done; {clock.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
