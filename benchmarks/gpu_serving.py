"""Serving benchmark of one mesh layout on the GPU machine, vLLM's method through the
gateway: random token-id prompts of fixed input:output lengths, ``ignore_eos``, a max-concurrency
sweep; per load point the client metrics (``pdmesh.bench``) plus what the workers' own metrics say
over exactly that load point (decode step time, prefill time).

Layouts (``--layout``), all serving the ``llama-3.1-8b`` dummy preset in bf16:
  disagg-1gpu     1 prefill + 1 decode worker sharing GPU ``--gpus[0]`` (cuda_ipc on one GPU)
  colocated-1gpu  1 'both' worker on GPU ``--gpus[0]``
  disagg-2gpu     prefill on ``--gpus[0]``, decode on ``--gpus[1]`` (cuda_ipc across GPUs)
  colocated-2gpu  2 'both' workers, one per GPU (two replicas behind one gateway)

Writes ``OUT/serving-LAYOUT-IN_OUT.json`` per shape (``pdmesh bench`` result format, so
``pdmesh bench plot`` draws them) with extra per-point keys ``worker`` (step/prefill times).

    python benchmarks/gpu_serving.py --layout disagg-1gpu --gpus 0 --out /tmp/serving
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.synthetic_tokenizer import write as write_tokenizer  # noqa: E402
from pdmesh.bench.datasets import random_dataset  # noqa: E402
from pdmesh.bench.metrics import summarize  # noqa: E402
from pdmesh.bench.runner import Target, run_load  # noqa: E402
from tests.meshproc import Services, scrape, wait_idle  # noqa: E402

SLOS = {"tpot35": {"tpot": 35.0}, "tpot40": {"tpot": 40.0}}
PERCENTILES = (50, 90, 99)


def layout(name: str, gpus: list[int], util_1gpu_disagg: float, cpu: bool = False) -> list[tuple[str, list[str]]]:
    """(service name, extra flags) of each worker."""
    dev = lambda i: ["--device", "cpu" if cpu else f"cuda:{gpus[i]}"]  # noqa: E731
    if name == "disagg-1gpu":
        u = ["--gpu-memory-utilization", str(util_1gpu_disagg)]
        return [("prefill-0", dev(0) + u), ("decode-0", dev(0) + u)]
    if name == "colocated-1gpu":
        return [("both-0", dev(0))]
    if name == "disagg-2gpu":
        return [("prefill-0", dev(0)), ("decode-0", dev(1))]
    if name == "colocated-2gpu":
        return [("both-0", dev(0)), ("both-1", dev(1))]
    raise SystemExit(f"unknown layout {name!r}")


def worker_window(names: list[str], before: dict[str, dict], after: dict[str, dict]) -> dict:
    """Worker-side figures over one load point (deltas of their Prometheus series), summed over the
    workers ``names``: steps, mean step time and tokens sampled by step kind, prompts computed
    (first tokens), engine step seconds in all, mean prefill time, KV transfers."""
    def d(name: str, key: str) -> float:
        return after[name].get(key, 0.0) - before[name].get(key, 0.0)

    def total(keys: list[str]) -> float:
        return sum(d(n, k) for n in names for k in keys)

    def mean_ms(sums: list[str], counts: list[str]) -> Optional[float]:
        c = total(counts)
        return 1e3 * total(sums) / c if c else None

    def of(series: str, *kinds: str) -> list[str]:
        return [f'pdmesh:{series}{{kind="{k}"}}' for k in kinds]

    out: dict = {}
    for kind in ("decode", "mixed", "prefill"):
        out[f"{kind}_steps"] = total(of("engine_step_seconds_count", kind))
        out[f"mean_{kind}_step_ms"] = mean_ms(of("engine_step_seconds_sum", kind), of("engine_step_seconds_count", kind))
        out[f"{kind}_step_tokens"] = total(of("engine_step_tokens_total", kind))
        out[f"token_weighted_{kind}_step_ms"] = mean_ms(of("engine_step_token_seconds_total", kind),
                                                        of("engine_step_tokens_total", kind))
    # the step time an output token waited for, over the steps that decode (decode + mixed)
    out["token_weighted_step_ms"] = mean_ms(of("engine_step_token_seconds_total", "decode", "mixed"),
                                            of("engine_step_tokens_total", "decode", "mixed"))
    out["step_seconds"] = total(of("engine_step_seconds_sum", "decode", "mixed", "prefill"))
    out["prompts"] = total(["pdmesh:request_prefill_time_seconds_count"])
    out["mean_prefill_time_ms"] = mean_ms(["pdmesh:request_prefill_time_seconds_sum"], ["pdmesh:request_prefill_time_seconds_count"])
    out["kv_transfer_bytes"] = total(["pdmesh:kv_transfer_bytes_total"])
    out["mean_kv_transfer_ms"] = mean_ms(["pdmesh:kv_transfer_seconds_sum"], ["pdmesh:kv_transfer_seconds_count"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", required=True)
    p.add_argument("--gpus", type=int, nargs="+", default=[0, 1])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--shapes", nargs="+", default=["3500:256", "2500:256"], help="INPUT:OUTPUT token lengths")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompts-per-concurrency", type=float, default=2.0, help="requests per load point = max(min, this x concurrency)")
    p.add_argument("--min-prompts", type=int, default=6)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--util-1gpu-disagg", type=float, default=0.45, help="--gpu-memory-utilization of each of the two workers on one GPU")
    p.add_argument("--worker-args", default="", help="extra flags for every worker")
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="")
    p.add_argument("--cpu", action="store_true", help="dry run of this script on CPU (tiny shapes, a small preset)")
    a = p.parse_args()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"serving-{a.layout}-"))
    from pdmesh.models.presets import PRESETS  # noqa: PLC0415 - after sys.path

    vocab = PRESETS[a.model]["vocab_size"]
    tok_dir = write_tokenizer(vocab, tmp / "tokenizer")
    model = ["--model", a.model, "--load-format", "dummy", "--tokenizer", str(tok_dir), "--max-model-len", "8192"]
    workers = layout(a.layout, a.gpus, a.util_1gpu_disagg, a.cpu)
    num_gpus = 1 if a.layout.endswith("1gpu") else 2
    t0 = time.monotonic()
    svc = Services(tmp, prefill=0, decode=0, both=0, gateway_args=tuple(model),
                   worker_args=tuple(model + ["--max-num-seqs", str(a.max_num_seqs)] + a.worker_args.split()),
                   workers=tuple((n, tuple(x)) for n, x in workers))
    names = [n for n, _ in workers]
    rcs: dict = {}
    try:
        roles = [n.split("-")[0] for n in names]
        svc.wait_workers(roles.count("prefill"), roles.count("decode"), timeout=420, both=roles.count("both"))
        startup_s = time.monotonic() - t0
        print(f"[{a.layout}] mesh up in {startup_s:.0f}s: {names}", flush=True)
        target = Target(svc.base, a.model)
        from pdmesh.tokenizer import Tokenizer

        tok = Tokenizer(str(tok_dir))
        for shape in a.shapes:
            in_len, out_len = (int(x) for x in shape.split(":"))
            points = []
            warm = random_dataset(4, in_len, 16, vocab, tok.decode, [vocab - 1], 0.0, seed=999)
            asyncio.run(run_load(target, warm, max_concurrency=4))  # JIT variants, graphs, allocator
            for conc in a.concurrency:
                n = max(a.min_prompts, int(a.prompts_per_concurrency * conc))
                reqs = random_dataset(n, in_len, out_len, vocab, tok.decode, [vocab - 1], 0.0, seed=conc)
                before = {w: scrape(svc.metrics_url(w)) for w in names}
                results, duration = asyncio.run(run_load(target, reqs, float("inf"), conc))
                after = {w: scrape(svc.metrics_url(w)) for w in names}
                m = summarize(results, duration, PERCENTILES, SLOS["tpot35"], num_gpus)
                m["request_goodput_tpot35"] = m.pop("request_goodput")
                m["request_goodput_tpot40"] = summarize(results, duration, PERCENTILES, SLOS["tpot40"], num_gpus)["request_goodput"]
                wk = worker_window(names, before, after)
                points.append({"label": f"{a.layout} {in_len}:{out_len}", "request_rate": "inf", "max_concurrency": conc,
                               "burstiness": 1.0, "goodput_slo_ms": SLOS["tpot35"], "metrics": m, "worker": wk,
                               "errors": sorted({r.error for r in results if not r.success})[:5]})
                print(f"[{a.layout}] {in_len}:{out_len} conc={conc:<3} n={n:<4} ok={m['completed']:.0f} fail={m['failed']:.0f} "
                      f"{m['request_throughput']:.2f} req/s {m['output_throughput_per_gpu']:.0f} tok/s/GPU "
                      f"TTFT med {m['median_ttft_ms']:.1f} TPOT med {m['median_tpot_ms']:.2f} ms "
                      f"decode step {wk['mean_decode_step_ms'] or 0:.2f} ms per token {wk['token_weighted_step_ms'] or 0:.2f} ms "
                      f"prefill {wk['mean_prefill_time_ms'] or 0:.1f} ms",
                      flush=True)
            doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": a.commit,
                   "layout": a.layout, "num_gpus": num_gpus, "gpus": a.gpus, "model": a.model, "dtype": "bfloat16",
                   "input_len": in_len, "output_len": out_len, "startup_s": startup_s, "workers": names,
                   "command": "python benchmarks/gpu_serving.py " + " ".join(sys.argv[1:]),
                   "endpoint": "completions", "dataset": "random", "points": points}
            wait_idle(svc.scheduler, timeout=30, expect=len(names))  # raises unless every KV block is free again
            doc["kv_all_free_after"] = True
            (out_dir / f"serving-{a.layout}-{in_len}_{out_len}.json").write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        rcs = svc.stop_all()
        print(f"[{a.layout}] stopped: {rcs}", flush=True)
        for name, proc in svc.procs.items():
            (out_dir / f"log-{a.layout}-{name}.txt").write_text(proc.tail(80))
    return 0 if all(rc == 0 for rc in rcs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
