"""Multi-level KV cache and routing by cached prefix on one GPU host (issue: multi-level KV cache).
One command on the GPU machine, one H200 (every worker shares GPU 0), within about 8 minutes with
FlashInfer's compile cache cold (``OUT=... bash benchmarks/gpu_pass.sh kvtiers`` installs the wheels):

    python3 benchmarks/gpu_kv_tiers.py --out $OUT/kv_tiers.json

The source's shared-prefix workload (30 groups x 100 prompts, 2,048-token prefix, 6,144-token
suffix, 2 output tokens, concurrency 8), scaled down in the number of groups and prompts only
(--groups 6 --per-group 8: 48 requests per configuration; lengths, output and concurrency as the
source), against llama-3.1-8b (dummy weights, synthetic tokenizer), with the prefill worker's device
pool deliberately too small for the working set (--prefill-blocks 2304 blocks of 32 tokens: eight
8,192-token requests in flight leave room for about four prefixes among the suffixes' churn).

One scheduler, one decode worker and one gateway stay up; prefill workers are swapped between
configurations (each starts cold):

1. none: no lower tier;  2. host: --kv-offload-cpu-gb (all prefixes fit);  3. host+disk: a host
tier too small for them (--small-host-gb) over a disk tier;  4./5. two prefill workers with the host
tier, --routing least-loaded then kv-aware (two fresh workers each; the same prompts everywhere).

Tokens first: before each configuration's load, a probe sends P+s1 alone, then enough other prompts
to push P out of the device pool, then P+s2 alone (greedy, 2 tokens).  The first configuration's
tokens are the reference: in 'none' P+s2 is recomputed (the probe checks it was: 0 cached tokens),
in the tier configurations its prefix is loaded from host memory or disk (checked: at least the
prefix counted as cached), and the tokens must be identical (P is exactly one prefill chunk, so
recomputed and reloaded KV are the same bits).  A configuration whose tokens differ is not
measured, and the script exits 1.

For each: the client's TTFT (mean, median, p99, from ``pdmesh bench``) and the prefix hit rate, from
the prefill workers' metrics: prompt tokens not recomputed (device prefix cache + lower tiers) over
prompt tokens, against the ideal (every prompt but its group's first reuses the whole prefix).
Goals: mean TTFT at least 30% lower than 'none', hit rate at least 90% of the ideal.  Note: with
the source's proportions the prefix is a quarter of each prompt, so skipping it saves at most about
a quarter of the prefill compute; TTFT at concurrency 8 is mostly queueing behind that compute.
The JSON is rewritten after every configuration; past --deadline-s the remaining ones are skipped
(named in the JSON), so a slow machine still returns what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_tokenizer import write as write_tokenizer  # noqa: E402
from tests.meshproc import Services, scrape  # noqa: E402

import httpx  # noqa: E402


class GpuServices(Services):
    WORKER_ARGS: list[str] = []


def prefill_args(a, host_gb: float = 0.0, disk: str = "", disk_gb: float = 0.0) -> tuple[str, ...]:
    args = ["--device", a.device, "--gpu-memory-utilization", "0.25", "--num-kv-blocks", str(a.prefill_blocks),
            "--enforce-eager", "--max-num-batched-tokens", str(a.prefix), *cpu(a), *common(a)]  # P: one prefill chunk
    if host_gb:
        args += ["--kv-offload-cpu-gb", str(host_gb)]
    if disk:
        args += ["--kv-offload-disk-path", disk, "--kv-offload-disk-gb", str(disk_gb),
                 "--kv-offload-flush-seconds", "0"]  # swapped out for good: no need to keep its host tier
    return tuple(args)


def cpu(a) -> list[str]:
    """Worker flags of the CPU plumbing check (--device cpu): fp32, one thread per worker."""
    return ["--dtype", "float32", "--cpu-threads", "1"] if a.device == "cpu" else []


def common(a) -> list[str]:
    return ["--model", a.model, "--load-format", "dummy", "--tokenizer", a.tok, "--max-model-len", str(a.max_len)]


def hits(svc: Services, names: list[str]) -> dict:
    time.sleep(1.2)  # workers refresh these counters from their engine every 0.5 s
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


def complete(base: str, prompt: list[int], max_tokens: int, timeout: float) -> tuple[str, int]:
    """(text, cached prompt tokens) of one greedy completion of token ids (503 is retried for 30 s:
    the gateway has not seen a swapped-in worker yet)."""
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(base + "/v1/completions", timeout=timeout, json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def probe(a, svc: Services, names: list[str], vocab: int) -> dict:
    """P+s1 alone, other prompts until P has left the device pool, then P+s2 alone (module docstring)."""
    rng = random.Random(12345)  # the same prompts in every configuration
    ids = lambda n: [rng.randrange(10, vocab - 10) for _ in range(n)]  # noqa: E731
    p, s1, s2 = ids(a.prefix), ids(a.suffix), ids(a.suffix)
    churn = [ids(a.prefix + a.suffix) for _ in range(a.prefill_blocks * a.block // (a.prefix + a.suffix) + 2)]
    t1, c1 = complete(svc.base, p + s1, 2, a.bench_timeout)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda q: complete(svc.base, q, 1, a.bench_timeout), churn))
    before = hits(svc, names)
    t2, c2 = complete(svc.base, p + s2, 2, a.bench_timeout)
    after = hits(svc, names)
    return {"t1": t1, "cached1": c1, "t2": t2, "cached2": c2, "churn_prompts": len(churn),
            "hit_tokens2": {k: after[k] - before[k] for k in ("device", "host", "disk")}}


def check_tokens(label: str, pr: dict, ref: dict | None) -> list[str]:
    """What is wrong with a configuration's probe (empty: tokens identical and the tier was used)."""
    bad = []
    if pr["cached1"] != 0:
        bad.append(f"P+s1 on a fresh worker had {pr['cached1']} cached tokens")
    if ref is not None and (pr["t1"], pr["t2"]) != (ref["t1"], ref["t2"]):
        bad.append(f"tokens differ from the reference: {pr['t1']!r} {pr['t2']!r} vs {ref['t1']!r} {ref['t2']!r}")
    if label == "none" and pr["cached2"] != 0:
        bad.append(f"P+s2 found {pr['cached2']} cached tokens with no tier: the device pool is not too small")
    if label in ("host", "host+disk", "kv-aware") and pr["cached2"] < pr["prefix"]:
        bad.append(f"P+s2 reused {pr['cached2']} < {pr['prefix']} prefix tokens: the tiers did not serve it")
    if label == "host+disk" and pr["hit_tokens2"]["disk"] <= 0:
        bad.append("P+s2 found nothing on disk: the host tier is not too small, the disk tier went untested")
    return bad


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


def wait_routable(base: str, timeout: float) -> None:
    """Until the gateway answers /health (after a scheduler restart: its channel reconnects)."""
    deadline = time.monotonic() + timeout
    while httpx.get(base + "/health", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not route again after the scheduler restart")
        time.sleep(0.2)


def swap(svc: Services, old: list[str], new: list[tuple[str, tuple]], timeout: float) -> list[str]:
    for n in old:
        svc.stop(n)
    for n, args in new:
        svc.start(n, args)
    for n, _ in new:
        svc.wait_registered(n, timeout)
    svc.wait_workers(len(new), 1, timeout)
    wait_routable(svc.base, timeout)
    return [n for n, _ in new]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--per-group", type=int, default=8)
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
    ap.add_argument("--deadline-s", type=float, default=400,
                    help="no configuration starts after this many seconds (the rest are skipped and named)")
    a = ap.parse_args()
    from pdmesh.models.arch import arch_from_hf_config
    from pdmesh.models.presets import PRESETS

    work = Path(tempfile.mkdtemp())
    vocab = arch_from_hf_config(PRESETS[a.model]).vocab_size
    a.tok = str(write_tokenizer(vocab, work / "tok"))
    a.max_len = a.prefix + a.suffix + 64
    disk = a.disk_dir or str(work / "kvdisk")
    res: dict = {"model": a.model, "commit": os.environ.get("PDMESH_COMMIT", ""), "workload": {
        "groups": a.groups, "prompts_per_group": a.per_group, "prefix": a.prefix, "suffix": a.suffix, "output": 2,
        "concurrency": 8, "prefill_device_blocks": a.prefill_blocks, "block": a.block, "host_gb": a.host_gb,
        "small_host_gb": a.small_host_gb, "disk_gb": a.disk_gb}, "runs": {}, "tokens": {}, "skipped": []}
    state = {"ref": None, "bad": False}

    def save() -> None:
        res["elapsed_s"] = round(time.monotonic() - t0, 1)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")

    def run_config(label: str, key: str, names: list[str], seed: int) -> None:
        pr = probe(a, svc, names, vocab)
        pr["prefix"] = a.prefix
        bad = check_tokens(label, pr, state["ref"])
        state["ref"] = state["ref"] or pr
        res["tokens"][key] = dict(pr, ok=not bad, problems=bad)
        print(f"KVT tokens {key}: " + ("ok" if not bad else "; ".join(bad)) +
              f" (cached {pr['cached1']}, {pr['cached2']}: {pr['hit_tokens2']})", flush=True)
        if bad:
            state["bad"] = True
        else:
            res["runs"][key] = measure(a, svc, names, seed, label, work)
        save()

    def late(label: str) -> bool:
        if time.monotonic() - t0 > a.deadline_s:
            res["skipped"].append(label)
            print(f"KVT skipped {label}: past --deadline-s", flush=True)
            return True
        return False
    t0 = time.monotonic()
    decode = ("--device", a.device, "--gpu-memory-utilization", "0.3", "--num-kv-blocks", str(a.decode_blocks), *cpu(a), *common(a))
    svc = GpuServices(work, prefill=0, decode=0, gateway_args=tuple(common(a)),
                      workers=(("decode-0", decode), ("prefill-0", prefill_args(a))))
    try:
        svc.wait_workers(1, 1, a.start_timeout)
        res["start_s"] = round(time.monotonic() - t0, 1)
        names, seed = ["prefill-0"], 0
        configs = [("none", None), ("host", [("prefill-1", prefill_args(a, a.host_gb))]),
                   ("host+disk", [("prefill-2", prefill_args(a, a.small_host_gb, disk, a.disk_gb))])]
        for label, new in configs:
            if label not in a.only or late(label):
                continue
            if new is not None:
                names = swap(svc, names, new, a.start_timeout)
            run_config(label, label, names, seed)
        for i, policy in enumerate(("least-loaded", "kv-aware")):
            if policy not in a.only or late(policy):
                continue
            svc.scheduler_args = ["--routing", policy]
            svc.stop("scheduler")
            svc.start("scheduler")
            # two fresh prefill workers per policy: both start cold, like every configuration
            two = [(f"prefill-{3 + 2 * i + k}", prefill_args(a, a.host_gb)) for k in range(2)]
            names = swap(svc, names, two, a.start_timeout)
            run_config(policy, f"2 prefill, {policy}", names, seed)
    finally:
        res["stop"] = svc.stop_all()
        res["total_s"] = round(time.monotonic() - t0, 1)
        for n, p in svc.procs.items():
            (Path(a.out).parent / f"kv_tiers-{n}.log").write_text(p.tail(400))
    runs = res["runs"]
    if "none" in runs:
        base = runs["none"]["mean_ttft_ms"]
        for r in runs.values():
            r["mean_ttft_vs_none"] = r["mean_ttft_ms"] / base if base else None
    save()
    print("KVTIERS " + json.dumps(res), flush=True)
    print(f"{'config':<26}{'mean TTFT ms':>14}{'p99 TTFT ms':>13}{'vs none':>9}{'hit rate':>10}{'of ideal':>10}")
    for k, r in runs.items():
        print(f"{k:<26}{r['mean_ttft_ms']:>14.1f}{r['p99_ttft_ms']:>13.1f}{(r.get('mean_ttft_vs_none') or 0):>9.2f}"
              f"{r['hit_rate']:>10.3f}{r['hit_over_ideal']:>10.2f}")
    for k, t in res["tokens"].items():
        print(f"tokens {k}: " + ("identical" if t["ok"] else "WRONG: " + "; ".join(t["problems"])))
    if state["bad"] or res["skipped"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
