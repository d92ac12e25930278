"""Multi-level KV cache and routing by cached prefix on one GPU host (issue: multi-level KV cache).
Run on the GPU machine in one command (see results/README.md for the exact one):

    python3 benchmarks/gpu_kv_tiers.py --out $OUT/kv_tiers.json

The source's shared-prefix workload (30 groups x 100 prompts, 2,048-token prefix, 6,144-token
suffix, 2 output tokens, concurrency 8), scaled down in the number of groups and prompts only
(--groups 6 --per-group 12: 72 requests per configuration; lengths, output and concurrency as the
source), against llama-3.1-8b (dummy weights, synthetic tokenizer), with the prefill worker's device
pool deliberately too small for the working set (--prefill-blocks 2304 blocks of 32 tokens: eight
8,192-token requests in flight leave room for about four prefixes among the suffixes' churn).

One scheduler, one decode worker and one gateway stay up; prefill workers are swapped between
configurations (each starts cold):

1. none: no lower tier;  2. host: --kv-offload-cpu-gb (all prefixes fit);  3. host+disk: a host
tier too small for them (--small-host-gb) over a disk tier;  4./5. two prefill workers with the host
tier, --routing least-loaded then kv-aware (each on its own prompts: other groups).

For each: the client's TTFT (mean, median, p99, from ``pdmesh bench``) and the prefix hit rate, from
the prefill workers' metrics: prompt tokens not recomputed (device prefix cache + lower tiers) over
prompt tokens, against the ideal (every prompt but its group's first reuses the whole prefix).
Goals: mean TTFT at least 30% lower than 'none', hit rate at least 90% of the ideal.  Note: with
the source's proportions the prefix is a quarter of each prompt, so skipping it saves at most about
a quarter of the prefill compute; TTFT at concurrency 8 is mostly queueing behind that compute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_tokenizer import write as write_tokenizer  # noqa: E402
from tests.meshproc import Services, scrape  # noqa: E402


class GpuServices(Services):
    WORKER_ARGS: list[str] = []


def prefill_args(a, host_gb: float = 0.0, disk: str = "", disk_gb: float = 0.0) -> tuple[str, ...]:
    args = ["--device", a.device, "--gpu-memory-utilization", "0.25", "--num-kv-blocks", str(a.prefill_blocks),
            "--enforce-eager", *common(a)]
    if host_gb:
        args += ["--kv-offload-cpu-gb", str(host_gb)]
    if disk:
        args += ["--kv-offload-disk-path", disk, "--kv-offload-disk-gb", str(disk_gb)]
    return tuple(args)


def common(a) -> list[str]:
    return ["--model", a.model, "--load-format", "dummy", "--tokenizer", a.tok, "--max-model-len", str(a.max_len)]


def hits(svc: Services, names: list[str]) -> dict:
    out = {"prompt": 0.0, "device": 0.0, "host": 0.0, "disk": 0.0}
    for n in names:
        m = scrape(svc.metrics_url(n))
        out["prompt"] += m.get("pdmesh:prompt_tokens_total", 0.0)
        out["device"] += m.get("pdmesh:prefix_cache_hits_total", 0.0)
        for t in ("host", "disk"):
            out[t] += m.get(f'pdmesh:kv_tier_hits_total{{tier="{t}"}}', 0.0)
    return out


def bench(a, base: str, seed: int, result: Path) -> dict:
    cmd = [sys.executable, "-m", "services.cli", "bench", "--base-url", base, "--tokenizer", a.tok, "--dataset",
           "shared-prefix", "--num-groups", str(a.groups), "--prompts-per-group", str(a.per_group), "--prefix-len",
           str(a.prefix), "--suffix-len", str(a.suffix), "--num-warmups", "0", "--seed", str(seed), "--no-progress",
           "--result-file", str(result)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.bench_timeout)
    if p.returncode != 0:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
    m = json.loads(result.read_text())["points"][0]["metrics"]
    return {k: m[k] for k in ("completed", "failed", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "duration_s")}


def measure(a, svc: Services, names: list[str], seed: int, label: str, work: Path) -> dict:
    before = hits(svc, names)
    r = bench(a, svc.base, seed, work / f"{label}.json")
    after = hits(svc, names)
    d = {k: after[k] - before[k] for k in after}
    n = a.groups * a.per_group
    ideal = (n - a.groups) * (a.prefix // a.block * a.block) / max(1.0, d["prompt"])
    rate = (d["device"] + d["host"] + d["disk"]) / max(1.0, d["prompt"])
    r.update(hit_rate=rate, ideal_hit_rate=ideal, hit_over_ideal=rate / ideal if ideal else 0.0,
             hit_tokens={k: d[k] for k in ("device", "host", "disk")}, prompt_tokens=d["prompt"])
    print(f"KVT {label}: " + json.dumps(r), flush=True)
    return r


def swap(svc: Services, old: list[str], new: list[tuple[str, tuple]], timeout: float) -> list[str]:
    for n in old:
        svc.stop(n)
    for n, args in new:
        svc.start(n, args)
    for n, _ in new:
        svc.wait_registered(n, timeout)
    svc.wait_workers(len(new), 1, timeout)
    return [n for n, _ in new]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--per-group", type=int, default=12)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--suffix", type=int, default=6144)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--prefill-blocks", type=int, default=2304)
    ap.add_argument("--decode-blocks", type=int, default=4096)
    ap.add_argument("--host-gb", type=float, default=16.0)
    ap.add_argument("--small-host-gb", type=float, default=3.0)
    ap.add_argument("--disk-gb", type=float, default=24.0)
    ap.add_argument("--disk-dir", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--only", nargs="*", default=["none", "host", "host+disk", "least-loaded", "kv-aware"])
    ap.add_argument("--device", default="cuda:0", help="cpu: a plumbing check with tiny sizes")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--bench-timeout", type=float, default=300)
    a = ap.parse_args()
    from pdmesh.models.arch import arch_from_hf_config
    from pdmesh.models.presets import PRESETS

    work = Path(tempfile.mkdtemp())
    a.tok = str(write_tokenizer(arch_from_hf_config(PRESETS[a.model]).vocab_size, work / "tok"))
    a.max_len = a.prefix + a.suffix + 64
    disk = a.disk_dir or str(work / "kvdisk")
    res: dict = {"model": a.model, "commit": os.environ.get("PDMESH_COMMIT", ""), "workload": {
        "groups": a.groups, "prompts_per_group": a.per_group, "prefix": a.prefix, "suffix": a.suffix, "output": 2,
        "concurrency": 8, "prefill_device_blocks": a.prefill_blocks, "block": a.block, "host_gb": a.host_gb,
        "small_host_gb": a.small_host_gb, "disk_gb": a.disk_gb}, "runs": {}}
    t0 = time.monotonic()
    decode = ("--device", a.device, "--gpu-memory-utilization", "0.3", "--num-kv-blocks", str(a.decode_blocks), *common(a))
    svc = GpuServices(work, prefill=0, decode=0, gateway_args=tuple(common(a)),
                      workers=(("decode-0", decode), ("prefill-0", prefill_args(a))))
    try:
        svc.wait_workers(1, 1, a.start_timeout)
        res["start_s"] = round(time.monotonic() - t0, 1)
        names, seed = ["prefill-0"], 0
        configs = [("none", None), ("host", [("prefill-1", prefill_args(a, a.host_gb))]),
                   ("host+disk", [("prefill-2", prefill_args(a, a.small_host_gb, disk, a.disk_gb))])]
        for label, new in configs:
            if label not in a.only:
                continue
            if new is not None:
                names = swap(svc, names, new, a.start_timeout)
            res["runs"][label] = measure(a, svc, names, seed, label, work)
        two = [("prefill-3", prefill_args(a, a.host_gb)), ("prefill-4", prefill_args(a, a.host_gb))]
        for i, policy in enumerate(("least-loaded", "kv-aware")):
            if policy not in a.only:
                continue
            if names != [n for n, _ in two]:
                names = swap(svc, names, two, a.start_timeout)
            svc.scheduler_args = ["--routing", policy]
            svc.stop("scheduler")
            svc.start("scheduler")
            svc.wait_workers(2, 1, a.start_timeout)
            time.sleep(3)  # the gateway's channel to the restarted scheduler reconnects
            res["runs"][f"2 prefill, {policy}"] = measure(a, svc, names, 100 + i, policy, work)
    finally:
        res["stop"] = svc.stop_all()
        res["total_s"] = round(time.monotonic() - t0, 1)
        for n, p in svc.procs.items():
            (Path(a.out).parent / f"kv_tiers-{n}.log").write_text(p.tail(400))
    runs = res["runs"]
    if "none" in runs:
        base = runs["none"]["mean_ttft_ms"]
        for k, r in runs.items():
            r["mean_ttft_vs_none"] = r["mean_ttft_ms"] / base if base else None
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print("KVTIERS " + json.dumps(res), flush=True)
    print(f"{'config':<26}{'mean TTFT ms':>14}{'p99 TTFT ms':>13}{'vs none':>9}{'hit rate':>10}{'of ideal':>10}")
    for k, r in runs.items():
        print(f"{k:<26}{r['mean_ttft_ms']:>14.1f}{r['p99_ttft_ms']:>13.1f}{(r.get('mean_ttft_vs_none') or 0):>9.2f}"
              f"{r['hit_rate']:>10.3f}{r['hit_over_ideal']:>10.2f}")


if __name__ == "__main__":
    main()
