"""`pdmesh up` on a GPU host as a user runs it: warm start and KV pulls under load (issue: `pdmesh up`
on real hosts). Run on the GPU machine, first thing on a fresh machine (empty compile caches):

    python3 benchmarks/gpu_up.py --out $OUT/up.json [--model llama-3.1-8b] [--load-concurrency 64]

1. Reference tokens: one engine on cuda:0 (its own FlashInfer/Triton cache dirs, so the mesh below
   still starts from empty caches) greedily continues two 3,500-token prompts.
2. ``pdmesh up`` (default placement: prefill on GPU 0, decode on GPU 1), timed from spawn to
   "pdmesh is up", with the phases its workers log (weights, graphs, warm-up).
3. The first request after ready and a second of the same shape (another prompt): latency ratio
   (goal <= 2x), tokens checked against the reference.
4. KV pulls alone (concurrency 1) and under load (``--load-concurrency``, 3,500:256 so that decode
   runs a full batch while new pulls arrive): every pull's time from the decode worker's log;
   median and p99 against the pull alone (goals 2x and 5x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_tokenizer import write as write_tokenizer  # noqa: E402
from pdmesh.bench.metrics import percentile  # noqa: E402
from tests.meshproc import free_port, mesh_secret_file  # noqa: E402

PULL = re.compile(r"pulled (\d+) blocks \((\d+) cached locally\) (\d+) bytes via (\S+) in ([\d.]+)ms"
                  r"(?: \(copy ([\d.]+)ms on the GPU\))?")
"""A decode worker's log line per pull: group 5 the wall time from the transfer's start in the engine
until the engine saw it end, group 6 (when logged) the copy's own time on the GPU."""


def prompt(n: int, salt: int, vocab: int) -> list[int]:
    return [(salt * 104729 + i * 7919) % (vocab - 2) + 1 for i in range(n)]


def ids_of(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"t(\d+)", text)]


def reference(model: str, prompts: list[list[int]], out: int, max_len: int, tok, own_caches: bool = True,
              device: str = "cuda:0", tp: int = 1) -> list[list[int]]:
    """Greedy tokens of one engine on ``device`` (``tp`` ranks: 'cuda:0,1'), in a child process (with
    compile caches of its own when ``own_caches``, so that a mesh started later still starts from
    empty ones)."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from pdmesh.engine import SamplingParams
from pdmesh.engine.engine import LLMEngine
from pdmesh.testing import engine_config
eng = LLMEngine(engine_config({model!r}, device={device!r}, dtype={"float32" if device == "cpu" else "bfloat16"!r}, num_kv_blocks=1024,
                              max_model_len={max_len}, max_num_seqs=128,
                              max_tokens_step=2048, tensor_parallel_size={tp}))
res = []
for i, p in enumerate(json.loads(sys.stdin.read())):
    eng.add_request(f"r{{i}}", p, SamplingParams(temperature=0, max_tokens={out}, ignore_eos=True))
    ids = []
    while eng.has_work():
        for o in eng.step():
            ids += o.new_token_ids
    res.append(ids)
eng.close()
print("REF " + json.dumps(res))
"""
    scratch = Path(tempfile.mkdtemp())
    env = dict(os.environ, FLASHINFER_WORKSPACE_BASE=str(scratch / "fi"), TRITON_CACHE_DIR=str(scratch / "triton")) \
        if own_caches else None
    p = subprocess.run([sys.executable, "-c", code], input=json.dumps(prompts), capture_output=True, text=True, env=env,
                       timeout=900)
    line = next((x for x in p.stdout.splitlines() if x.startswith("REF ")), None)
    if line is None:
        raise RuntimeError(f"reference failed:\n{p.stderr[-3000:]}")
    return [ids_of(tok.decode(ids)) for ids in json.loads(line[4:])]


class Up:
    """`pdmesh up` with everything it prints in one log file; its scheduler at ``scheduler``, with the
    mesh secret of ``tests.meshproc`` (so ``list_workers``/``wait_idle`` can ask it)."""

    def __init__(self, log: Path, args: list[str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.scheduler = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "services.cli", "up", "--port", str(self.port), "--grpc-port", str(free_port()),
               "--metrics-port", str(free_port()), "--scheduler-port", self.scheduler.rsplit(":", 1)[1],
               "--scheduler-metrics-port", str(free_port()), "--mesh-secret-file", mesh_secret_file(log.parent), *args]
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self, timeout: float) -> float:
        while time.monotonic() - self.t0 < timeout:
            if "pdmesh is up" in self.text():
                return time.monotonic() - self.t0
            if self.p.poll() is not None:
                raise RuntimeError("pdmesh up exited:\n" + self.text()[-4000:])
            time.sleep(0.5)
        raise TimeoutError(self.text()[-4000:])

    def stop(self) -> int:
        os.killpg(self.p.pid, signal.SIGTERM)
        try:
            return self.p.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            return -9


def complete(base: str, ids: list[int], out: int) -> tuple[float, float, list[int]]:
    """(ttft s, e2e s, token ids) of one streamed greedy completion."""
    t0 = time.perf_counter()
    ttft, text = None, ""
    with httpx.stream("POST", base + "/v1/completions", timeout=900, json={
            "prompt": ids, "max_tokens": out, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(f"error event: {obj['error']}")
                c = obj["choices"]
                if c and c[0].get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text += c[0]["text"]
    return ttft or 0.0, time.perf_counter() - t0, ids_of(text)


def phases(log: str) -> dict:
    out = {}
    for role in ("prefill", "decode"):
        lines = [x for x in log.splitlines() if f" {role}[" in x]
        for key, pat in (("weights_s", r"weights loaded in ([\d.]+) s"), ("warmup_s", r"warm-up done in ([\d.]+) s")):
            m = next((re.search(pat, x) for x in lines if re.search(pat, x)), None)
            if m:
                out[f"{role}_{key}"] = float(m.group(1))
    return out


def pulls(log: str, start: int, device: bool = False) -> list[float]:
    """Pull times (ms) logged after offset ``start``: wall times, or the GPU copy times."""
    group = 6 if device else 5
    return [float(m.group(group)) for m in PULL.finditer(log[start:]) if m.group(group)]


def pull_stats(log: str, start: int) -> dict:
    out = {}
    for key, dev in (("wall", False), ("gpu", True)):
        xs = pulls(log, start, dev)
        if xs:
            out[key] = {"n": len(xs), "median": statistics.median(xs), "p99": percentile(xs, 99), "max": max(xs)}
    return out


def bench(base: str, tok_dir: Path, conc: int, n: int, inp: int, out: int, result: Path, num_gpus: int = 0) -> dict:
    """One load point of ``pdmesh bench`` (random token-id prompts, ``ignore_eos``); its metrics (the
    whole result, with every request's figures, in ``result``)."""
    p = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--base-url", base, "--tokenizer", str(tok_dir),
                        "--dataset", "random", "--random-input-len", str(inp), "--random-output-len", str(out),
                        "--num-prompts", str(n), "--max-concurrency", str(conc), "--num-warmups", "0", "--no-progress",
                        "--num-gpus", str(num_gpus), "--result-file", str(result)], capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
    return json.loads(result.read_text())["points"][0]["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--input-len", type=int, default=3500)
    ap.add_argument("--load-concurrency", type=int, default=64)
    ap.add_argument("--load-prompts", type=int, default=128)
    ap.add_argument("--load-output", type=int, default=256)
    ap.add_argument("--skip", nargs="*", default=[], help="stages to skip: reference, load")
    a = ap.parse_args()
    from pdmesh.models.arch import arch_from_hf_config
    from pdmesh.models.presets import PRESETS
    from pdmesh.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp())
    vocab = arch_from_hf_config(PRESETS[a.model]).vocab_size
    tok_dir = write_tokenizer(vocab, work / "tok")
    tok = Tokenizer(str(tok_dir))
    max_len = 8192
    prompts = [prompt(a.input_len, s, vocab) for s in (1, 2)]
    res: dict = {"model": a.model, "commit": os.environ.get("PDMESH_COMMIT", ""), "input_len": a.input_len}
    t = time.monotonic()
    ref = reference(a.model, prompts, 64, max_len, tok) if "reference" not in a.skip else None
    res["reference_s"] = round(time.monotonic() - t, 1)
    up = Up(work / "up.log", ["--model", a.model, "--load-format", "dummy", "--tokenizer", str(tok_dir),
                              "--max-model-len", str(max_len)])
    try:
        res["ready_s"] = round(up.wait_up(900), 1)
        res.update(phases(up.text()))
        first = complete(up.base, prompts[0], 64)
        warm = complete(up.base, prompts[1], 64)
        res["first_request"] = {"ttft_ms": first[0] * 1e3, "e2e_ms": first[1] * 1e3}
        res["warm_request"] = {"ttft_ms": warm[0] * 1e3, "e2e_ms": warm[1] * 1e3}
        res["first_over_warm_e2e"] = first[1] / warm[1]
        res["first_over_warm_ttft"] = first[0] / warm[0]
        if ref is not None:
            res["tokens_match_reference"] = [first[2] == ref[0], warm[2] == ref[1]]
        if "load" not in a.skip:
            mark = len(up.text())
            m1 = bench(up.base, tok_dir, 1, 8, a.input_len, 32, work / "c1.json")
            alone = pull_stats(up.text(), mark)
            mark = len(up.text())
            mn = bench(up.base, tok_dir, a.load_concurrency, a.load_prompts, a.input_len, a.load_output, work / "cn.json")
            loaded = pull_stats(up.text(), mark)
            res["pull_alone_ms"], res["pull_loaded_ms"] = alone, dict(loaded, concurrency=a.load_concurrency)
            for key in loaded:
                res[f"pull_{key}_median_ratio"] = loaded[key]["median"] / alone[key]["median"]
                res[f"pull_{key}_p99_ratio"] = loaded[key]["p99"] / alone[key]["median"]
            res["load_bench"] = {k: mn[k] for k in ("completed", "failed", "median_ttft_ms", "median_tpot_ms", "p99_itl_ms",
                                                    "output_throughput")}
            res["alone_bench"] = {k: m1[k] for k in ("completed", "failed", "median_ttft_ms", "median_tpot_ms")}
    finally:
        res["stop_rc"] = up.stop()
        Path(a.out).with_suffix(".log").write_text(up.text())
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print("UP " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
