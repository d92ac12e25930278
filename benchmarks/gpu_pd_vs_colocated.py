"""Disaggregated against colocated serving on two GPUs, as users start it (``pdmesh up``), at the
source deployments' shape (3,500:1,500 by default). Run on the 2-GPU machine:

    python3 benchmarks/gpu_pd_vs_colocated.py --out $OUT [--shape 3500:1500] [--concurrency 32 64 128]

Layouts (llama-3.1-8b dummy, bf16, synthetic tokenizer, random token-id prompts, ``ignore_eos``):
  disagg          ``pdmesh up`` default placement: 1 prefill on GPU 0, 1 decode on GPU 1 (cuda_ipc)
  colocated-C     ``pdmesh up --prefill 0 --decode 0 --colocated 2``: one 'both' replica per GPU,
                  chunked prefill of C tokens per step (``--max-num-batched-tokens C``)

For every mesh, before any load, its tokens are checked: greedy continuations of two prompts,
sent one at a time, must equal one engine on cuda:0. Then per load point ``pdmesh bench`` writes
``OUT/pd-IN_OUT-LAYOUT-cN.json`` (per-request records: goodput can be recomputed at any SLO;
``benchmarks/gpu_pd_report.py`` does). The colocated chunk size is swept at ``--sweep-concurrency``
and the best (output throughput) runs the other concurrencies. The disaggregated mesh also gives
the KV pull time of each request (decode worker's log): alone (concurrency 1) and under load.
Points are written as they finish, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_serving import worker_window  # noqa: E402
from benchmarks.gpu_up import Up, bench, complete, prompt, pull_stats, reference  # noqa: E402
from benchmarks.synthetic_tokenizer import write as write_tokenizer  # noqa: E402

LISTENER = re.compile(r"^\s+((?:prefill|decode|both)-\d+)\s.*\smetrics (http://\S+/metrics)\s*$", re.M)
"""A worker's row in the listener table ``pdmesh up`` prints when it is up."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mesh_args(model: str, tok_dir: Path, cpu: bool) -> list[str]:
    """``pdmesh up`` flags for the dummy preset ``model`` (tiny and on CPU with ``cpu``)."""
    args = ["--model", model, "--load-format", "dummy", "--tokenizer", str(tok_dir), "--max-model-len", "8192"]
    if cpu:
        args += ["--dtype", "float32", "--worker-args", "--cpu-threads 1 --kv-cache-memory 268435456"]
    return args


def reference_tokens(model: str, prompts: list[list[int]], tok, ref_file: Optional[Path], cpu: bool) -> list[list[int]]:
    """Greedy tokens (48 per prompt) of one engine on cuda:0 (or the CPU), read from ``ref_file``
    when it exists, else computed (and written there)."""
    if ref_file is not None and ref_file.exists():
        log(f"reference tokens from {ref_file}")
        return json.loads(ref_file.read_text())
    log("reference tokens on " + ("cpu" if cpu else "cuda:0"))
    ref = reference(model, prompts, 48, 8192, tok, own_caches=False, device="cpu" if cpu else "cuda:0")
    if ref_file is not None:
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(json.dumps(ref) + "\n")
    return ref


def checked_mesh(name: str, args: list[str], log_file: Path, prompts: list[list[int]], ref: list[list[int]], checked: dict,
                 cpu: bool, disagg: bool) -> Up:
    """``pdmesh up ARGS``, up; its greedy tokens of ``prompts`` (sent one at a time) must equal ``ref``
    (an empty ``ref`` takes this mesh's), and a disaggregated mesh must have pulled every KV cache.
    Records the check in ``checked[name]``; stops the mesh and exits when it fails."""
    log(f"starting {name}")
    up = Up(log_file, args)
    up.wait_up(600)
    got = [complete(up.base, p, 48)[2] for p in prompts]
    if not ref:  # --reference colocated: the first mesh's tokens, checked against every later mesh's
        ref.extend(got)
    checked[name] = ok = [g == r for g, r in zip(got, ref)]
    log(f"{name} up; tokens equal to the reference: {ok}")
    why = "" if all(ok) else "wrong tokens"
    if disagg and not why:  # the KV really moved (a failed pull would be recomputed: right tokens, wrong figures)
        text = up.text()
        pulled = text.count("via cuda_ipc in") if not cpu else text.count(" pulled ")
        if pulled < len(prompts) or "KV pull via" in text:
            why = f"{pulled} pulls logged for {len(prompts)} requests, or a failed pull"
    if why:
        up.stop()
        raise SystemExit(f"{name}: {why}: not measuring")
    return up


def worker_urls(up: Up) -> dict[str, str]:
    """Every worker's /metrics URL, from the listener table ``pdmesh up`` printed."""
    return dict(LISTENER.findall(up.text()))


def measure(up: Up, layout: str, tok_dir: Path, inp: int, out: int, conc: int, n: int, path: Path, meta: dict) -> dict:
    """One ``pdmesh bench`` point (``n`` requests, at most ``conc`` at once) written to ``path``: the
    bench result plus ``meta``, the KV pulls the decode workers logged meanwhile, and every worker's
    metrics over the point (``workers``: ``gpu_serving.worker_window`` each; ``busy``: the share of
    the point's duration each spent in engine steps)."""
    from tests.meshproc import scrape

    urls = worker_urls(up)
    mark = len(up.text())
    before = {w: scrape(u) for w, u in urls.items()}
    m = bench(up.base, tok_dir, conc, n, inp, out, path)
    after = {w: scrape(u) for w, u in urls.items()}
    doc = json.loads(path.read_text())
    doc.update(meta, layout=layout, concurrency=conc)
    pulls = pull_stats(up.text(), mark)
    if pulls:
        doc["pull_ms"] = pulls
    doc["workers"] = {w: worker_window([w], before, after) for w in urls}
    doc["busy"] = {w: v["step_seconds"] / m["duration_s"] for w, v in doc["workers"].items() if m["duration_s"] > 0}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def run_points(up: Up, name: str, tok_dir: Path, inp: int, out: int, concs: list[int], args, summary: dict) -> None:
    for c in concs:
        n = max(c, int(c * args.prompts_per_concurrency))
        t0 = time.monotonic()
        path = Path(args.out) / f"pd-{inp}_{out}-{name}-c{c}.json"
        doc = measure(up, name, tok_dir, inp, out, c, n, path, {"commit": args.commit, "machine": "2 x NVIDIA H200"})
        m = doc["points"][0]["metrics"]
        summary["points"].append({"layout": name, "concurrency": c, "prompts": n, "wall_s": round(time.monotonic() - t0, 1),
                                  "output_throughput": m["output_throughput"], "median_tpot_ms": m["median_tpot_ms"],
                                  "median_ttft_ms": m["median_ttft_ms"], "failed": m["failed"], "pull_ms": doc.get("pull_ms")})
        log(f"{name} c={c}: {m['output_throughput']:.0f} tok/s, TPOT {m['median_tpot_ms']:.1f} ms, "
            f"TTFT {m['median_ttft_ms']:.0f} ms, failed {m['failed']}, pulls {doc.get('pull_ms')}")
        Path(args.out, "pd-summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--shape", default="3500:1500")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--chunks", type=int, nargs="+", default=[2048, 1024, 512], help="colocated chunked-prefill sizes")
    ap.add_argument("--sweep-concurrency", type=int, default=64)
    ap.add_argument("--prompts-per-concurrency", type=float, default=1.5)
    ap.add_argument("--commit", default=os.environ.get("PDMESH_COMMIT", ""))
    ap.add_argument("--cpu-smoke", action="store_true", help="check the script on a CPU host: tiny model and shapes")
    ap.add_argument("--reference", choices=("engine", "colocated"), default="engine",
                    help="what the meshes' tokens are checked against: one engine on cuda:0 (a child process), or, "
                         "to save its start-up, the first colocated mesh (one engine per replica): every mesh must "
                         "give the disaggregated mesh's tokens")
    ap.add_argument("--layouts", nargs="+", choices=("disagg", "colocated"), default=["disagg", "colocated"],
                    help="which meshes to measure (one call per layout fits the GPU machine's 10-minute limit)")
    ap.add_argument("--reference-file", default=None,
                    help="with --reference engine: read the reference tokens from this file when it exists, else "
                         "compute and write them (a later call measuring another layout checks the same tokens)")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.model, args.shape, args.concurrency, args.chunks, args.sweep_concurrency = "smollm2-135m", "48:6", [2, 3], [64, 32], 2
    from pdmesh.models.arch import arch_from_hf_config
    from pdmesh.models.presets import PRESETS
    from pdmesh.tokenizer import Tokenizer

    inp, out = (int(x) for x in args.shape.split(":"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    work = Path(args.out) / "work"
    vocab = arch_from_hf_config(PRESETS[args.model]).vocab_size
    tok_dir = write_tokenizer(vocab, work / "tok")
    tok = Tokenizer(str(tok_dir))
    prompts = [prompt(inp, s, vocab) for s in (11, 12)]
    ref_file = Path(args.reference_file) if args.reference_file else None
    ref = reference_tokens(args.model, prompts, tok, ref_file, args.cpu_smoke) if args.reference == "engine" else []
    model = mesh_args(args.model, tok_dir, args.cpu_smoke)
    summary: dict = {"shape": args.shape, "commit": args.commit, "points": [], "tokens_checked": {}}
    if args.reference == "colocated":
        summary["reference"] = "tokens of the first mesh, compared with every later mesh's"

    def mesh(name: str, extra: list[str]) -> Up:
        return checked_mesh(name, model + extra, work / f"{name}.log", prompts, ref, summary["tokens_checked"], args.cpu_smoke,
                            name == "disagg")

    if "disagg" in args.layouts:
        up = mesh("disagg", [])
        try:
            run_points(up, "disagg", tok_dir, inp, 32, [1], args, summary)  # pulls alone
            run_points(up, "disagg", tok_dir, inp, out, args.concurrency, args, summary)
        finally:
            up.stop()
    if "colocated" not in args.layouts:
        log("done")
        return
    best = (0.0, args.chunks[0])
    rest = [c for c in args.concurrency if c != args.sweep_concurrency]
    for chunk in args.chunks:
        up = mesh(f"colocated-{chunk}", ["--prefill", "0", "--decode", "0", "--colocated", "2",
                                         "--colocated-args", f"--max-num-batched-tokens {chunk}"])
        try:
            run_points(up, f"colocated-{chunk}", tok_dir, inp, out, [args.sweep_concurrency], args, summary)
            thr = summary["points"][-1]["output_throughput"]
            best = max(best, (thr, chunk))
            if chunk == args.chunks[0]:  # the default chunk runs every concurrency at once (a cut-short run keeps it)
                run_points(up, f"colocated-{chunk}", tok_dir, inp, out, rest, args, summary)
        finally:
            up.stop()
    if best[1] != args.chunks[0]:
        up = mesh(f"colocated-{best[1]}", ["--prefill", "0", "--decode", "0", "--colocated", "2",
                                           "--colocated-args", f"--max-num-batched-tokens {best[1]}"])
        try:
            run_points(up, f"colocated-{best[1]}", tok_dir, inp, out, rest, args, summary)
        finally:
            up.stop()
    summary["best_colocated_chunk"] = best[1]
    Path(args.out, "pd-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log("done")


if __name__ == "__main__":
    main()
