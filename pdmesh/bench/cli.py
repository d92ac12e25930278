"""``pdmesh bench``: run a serving benchmark (one load point or a sweep) and ``pdmesh bench plot``.

    pdmesh bench --base-url http://127.0.0.1:8000 --dataset random --random-input-len 3500 \\
        --random-output-len 1500 --num-prompts 200 --max-concurrency 1 8 64 --goodput tpot:35 \\
        --result-file results.json
    pdmesh bench plot results.json other.json --out latency.png
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from pathlib import Path
from typing import Optional, TypedDict

from pdmesh.bench.datasets import jsonl_dataset, random_dataset, shared_prefix_dataset
from pdmesh.bench.metrics import parse_goodput, summarize
from pdmesh.bench.runner import Target, run_load

TABLE = [("completed", "Successful requests", "{:.0f}"), ("failed", "Failed requests", "{:.0f}"),
         ("duration_s", "Duration (s)", "{:.2f}"), ("request_throughput", "Request throughput (req/s)", "{:.2f}"),
         ("output_throughput", "Output token throughput (tok/s)", "{:.1f}"),
         ("output_throughput_per_gpu", "Output tok/s per GPU", "{:.1f}"),
         ("total_token_throughput", "Total token throughput (tok/s)", "{:.1f}"),
         ("request_goodput", "Request goodput (req/s)", "{:.2f}")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdmesh bench", description="Serving benchmark (vLLM's method) against any "
                                "OpenAI-compatible server. 'pdmesh bench plot FILES' draws TTFT/TPOT against load.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (the /v1 routes are appended)")
    p.add_argument("--model", default=None, help="model name to send (default: none; pdmesh serves one model)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions with token-id prompts (exact lengths) or /v1/chat/completions with text")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or .gguf for prompts (default: pdmesh's embedded model)")
    p.add_argument("--dataset", choices=("random", "shared-prefix", "jsonl"), default="random")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per load point (random, jsonl)")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [L(1-r), L(1+r)]")
    p.add_argument("--num-groups", type=int, default=30, help="shared-prefix: groups")
    p.add_argument("--prompts-per-group", type=int, default=100, help="shared-prefix: prompts per group")
    p.add_argument("--prefix-len", type=int, default=2048, help="shared-prefix: shared prefix tokens")
    p.add_argument("--suffix-len", type=int, default=6144, help="shared-prefix: per-prompt suffix tokens")
    p.add_argument("--output-len", type=int, default=None, help="shared-prefix/jsonl output tokens (default: 2 for "
                   "shared-prefix, as its source workload; --random-output-len for jsonl)")
    p.add_argument("--dataset-path", default=None, help="jsonl: one {'prompt': str|[ids], 'output_len': n} per line")
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")],
                   help="requests/s (Poisson arrivals; several values sweep; inf: all at once)")
    p.add_argument("--max-concurrency", type=int, nargs="+", default=None, help="requests in flight at most (several "
                   "sweep; shared-prefix: 8 unless --request-rate or this is given)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival gaps (1: Poisson)")
    p.add_argument("--num-warmups", type=int, default=2, help="requests sent (and discarded) before each run")
    p.add_argument("--goodput", nargs="*", default=[], help="SLOs in ms: ttft:MS tpot:MS e2el:MS itl:MS (each "
                   "request's P99 inter-token latency); every request's figures are in the result file's 'requests'")
    p.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles to report")
    p.add_argument("--num-gpus", type=int, default=0, help="GPUs behind the endpoint (for per-GPU throughput)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="name of this configuration in results and plots")
    p.add_argument("--result-file", default=None, help="write every load point's results here (JSON)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _tokenizer(path: Optional[str]):
    from pdmesh.config import ModelConfig
    from pdmesh.models.loader import resolve
    from pdmesh.tokenizer import Tokenizer

    return Tokenizer(path or resolve(ModelConfig()).tokenizer_path)


class _SourceDefaults(TypedDict):
    output_len: int
    max_concurrency: list[int]


SHARED_PREFIX_SOURCE: _SourceDefaults = {"output_len": 2, "max_concurrency": [8]}
"""The shared-prefix workload of the multi-level KV cache deployment it reproduces (30 groups x 100
prompts, a 2,048-token prefix per group, 6,144-token suffixes: the flags' defaults), for what its
flags leave unset."""


def apply_dataset_defaults(a: argparse.Namespace) -> argparse.Namespace:
    """shared-prefix: the source workload's output length and concurrency where not given."""
    if a.dataset == "shared-prefix":
        a.output_len = a.output_len or SHARED_PREFIX_SOURCE["output_len"]
        if a.max_concurrency is None and a.request_rate == [float("inf")]:
            a.max_concurrency = list(SHARED_PREFIX_SOURCE["max_concurrency"])
    return a


def build_dataset(a: argparse.Namespace, tok) -> list:
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    special = list(tok.hf.all_special_ids)
    out_len = a.output_len or a.random_output_len
    if a.dataset == "random":
        return random_dataset(a.num_prompts + a.num_warmups, a.random_input_len, a.random_output_len, tok.vocab_size,
                              decode, special, a.random_range_ratio, a.seed)
    if a.dataset == "shared-prefix":
        return shared_prefix_dataset(a.num_groups, a.prompts_per_group, a.prefix_len, a.suffix_len, out_len,
                                     tok.vocab_size, decode, special, a.seed)
    if not a.dataset_path:
        raise SystemExit("pdmesh bench: --dataset jsonl needs --dataset-path")
    return jsonl_dataset(a.dataset_path, tok.encode, decode, out_len)


class Progress:
    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled, self.done = total, label, enabled, 0

    def __call__(self, _result) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // max(1, self.total)
            print(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}", end="",
                  file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)


def print_table(point: dict, m: dict, percentiles: list[float]) -> None:
    title = f" {point['label'] or 'pdmesh bench'}: rate={point['request_rate']} concurrency={point['max_concurrency']} "
    print(f"{title:=^64}")
    for key, name, fmt in TABLE:
        if key in m:
            print(f"{name:<48}{fmt.format(m[key]):>16}")
    for metric, name in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                         ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f"{'-' * 16}{name:^32}{'-' * 16}")
        print(f"{'Mean ' + metric.upper() + ' (ms)':<48}{m[f'mean_{metric}_ms']:>16.2f}")
        print(f"{'Median ' + metric.upper() + ' (ms)':<48}{m[f'median_{metric}_ms']:>16.2f}")
        for p in percentiles:
            print(f"{f'P{p:g} ' + metric.upper() + ' (ms)':<48}{m[f'p{p:g}_{metric}_ms']:>16.2f}")
    print("=" * 64)


def bench(a: argparse.Namespace) -> list[dict]:
    percentiles = [float(x) for x in a.percentiles.split(",") if x]
    slo = parse_goodput(a.goodput)
    tok = _tokenizer(a.tokenizer)
    reqs = build_dataset(a, tok)
    if a.dataset == "random":  # built with num_warmups extra prompts, kept apart from the measured ones
        warm, reqs = reqs[:a.num_warmups], reqs[a.num_warmups:]
    else:  # the first prompts of the file/groups, sent once more before measuring
        warm = reqs[:a.num_warmups]
    target = Target(a.base_url, a.model, a.endpoint, a.api_key)
    points = []
    concurrencies = a.max_concurrency or [None]
    for rate in a.request_rate:
        for conc in concurrencies:
            if warm:
                asyncio.run(run_load(target, warm, max_concurrency=len(warm)))
            prog = Progress(len(reqs), f"rate={rate} conc={conc}", not a.no_progress)
            results, duration = asyncio.run(run_load(target, reqs, rate, conc, a.burstiness, a.seed, prog))
            m = summarize(results, duration, percentiles, slo, a.num_gpus)
            point = {"label": a.label, "request_rate": rate if rate != float("inf") else "inf", "max_concurrency": conc,
                     "burstiness": a.burstiness, "goodput_slo_ms": slo, "metrics": m,
                     "errors": sorted({r.error for r in results if not r.success})[:5],
                     "requests": [r.record() for r in results]}
            print_table(point, m, percentiles)
            points.append(point)
    if a.result_file:
        doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "base_url": a.base_url, "endpoint": a.endpoint, "dataset": a.dataset,
               "command": "pdmesh bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
               "num_prompts": len(reqs), "mean_input_len": sum(r.prompt_len for r in reqs) / max(1, len(reqs)),
               "mean_output_len": sum(r.output_len for r in reqs) / max(1, len(reqs)), "points": points}
        Path(a.result_file).write_text(json.dumps(doc, indent=1) + "\n")
    return points


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        from pdmesh.bench.plot import main as plot_main

        return plot_main(argv[1:])
    a = apply_dataset_defaults(parser().parse_args(argv))
    try:
        points = bench(a)
    except ValueError as exc:
        print(f"pdmesh bench: {exc}", file=sys.stderr)
        return 2
    return 0 if all(p["metrics"]["completed"] > 0 for p in points) else 1
