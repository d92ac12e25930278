"""qwen3-32b dummy served by ``pdmesh up`` with tensor-parallel workers on the 2-GPU machine (issue 19),
tokens checked before any load (``benchmarks/gpu_tp.sh mesh``, its own command: about 6 minutes a layout):

    python3 benchmarks/gpu_tp_mesh.py --out $OUT --layouts a [b]

(a) prefill TP 2 and decode TP 2 sharing GPUs 0 and 1; (b) prefill TP 1 on GPU 0 and decode TP 2 on
GPUs 0,1 (memory shares by hand: prefill 0.6 of GPU 0, decode 0.33 of each).  Greedy tokens of three
prompts against one engine in one process (TP 1 on GPU 0) and one TP-2 engine; then ``pdmesh bench``
at concurrency 16 (1000:200) when the tokens are right.  Writes mesh-a.json / mesh-b.json.

Exactness in bf16: a different TP size sums in another order, so only the same layout is bitwise
equal: (a) must equal the TP-2 engine exactly; (b)'s first token must equal the TP-1 engine's (its
prefill is TP 1) and the rest is reported as the matching prefix.  tests/gpu/test_tp_gpu.py checks
hand-offs between TP sizes exactly in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "qwen3-32b"
MAX_LEN = 4096
PROMPTS = [(100, 1), (1000, 2), (2500, 3)]
OUT_TOKENS = 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


LAYOUTS = {
    "a": ("prefill TP2 + decode TP2 on GPUs 0,1", ["--prefill-tensor-parallel-size", "2", "--decode-tensor-parallel-size", "2"]),
    "b": ("prefill TP1 on GPU 0 + decode TP2 on GPUs 0,1", [
        "--prefill-tensor-parallel-size", "1", "--decode-tensor-parallel-size", "2",
        "--prefill-args", "--device cuda:0 --gpu-memory-utilization 0.6",
        "--decode-args", "--device cuda:0,1 --gpu-memory-utilization 0.33"]),
}


def main() -> None:
    from benchmarks.gpu_up import Up, bench, complete, prompt, pull_stats, reference
    from benchmarks.synthetic_tokenizer import write as write_tokenizer
    from pdmesh.models.arch import arch_from_hf_config
    from pdmesh.models.presets import PRESETS
    from pdmesh.tokenizer import Tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", nargs="+", default=["a"], choices=sorted(LAYOUTS))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    vocab = arch_from_hf_config(PRESETS[MODEL]).vocab_size
    tok_dir = write_tokenizer(vocab, work / "tok")
    tok = Tokenizer(str(tok_dir))
    prompts = [prompt(n, s, vocab) for n, s in PROMPTS]
    t = time.monotonic()
    refs = {"tp2": reference(MODEL, prompts, OUT_TOKENS, MAX_LEN, tok, own_caches=False, device="cuda:0,1", tp=2)}
    if "b" in a.layouts:
        refs["tp1"] = reference(MODEL, prompts, OUT_TOKENS, MAX_LEN, tok, own_caches=False, device="cuda:0")
    log(f"references ready in {time.monotonic() - t:.0f} s")
    for key in a.layouts:
        name, flags = LAYOUTS[key]
        up = Up(work / f"up-{key}.log", ["--model", MODEL, "--load-format", "dummy", "--tokenizer", str(tok_dir),
                                         "--max-model-len", str(MAX_LEN), *flags])
        res: dict = {"layout": name, "model": MODEL, "commit": os.environ.get("PDMESH_COMMIT", "")}
        try:
            res["ready_s"] = round(up.wait_up(420), 1)
            got = [complete(up.base, p, OUT_TOKENS)[2] for p in prompts]
            res["tokens_equal_tp2_engine"] = [g == r for g, r in zip(got, refs["tp2"])]
            if "tp1" in refs:
                res["first_token_equal_tp1_engine"] = [g[:1] == r[:1] for g, r in zip(got, refs["tp1"])]
                res["matching_prefix_tp1"] = [_prefix(g, r) for g, r in zip(got, refs["tp1"])]
            ok = all(res["tokens_equal_tp2_engine"]) if key == "a" else all(res["first_token_equal_tp1_engine"])
            res["tokens_ok"] = ok
            log(f"MESH {key} ({name}): ready in {res['ready_s']} s; tokens {'ok' if ok else 'WRONG'} {res}")
            if ok:
                mark = len(up.text())
                m = bench(up.base, tok_dir, 16, 48, 1000, 200, work / f"bench-{key}.json")
                res["bench_c16"] = {**{k: m[k] for k in ("completed", "failed", "median_ttft_ms", "median_tpot_ms",
                                                          "output_throughput")}, "pull_ms": pull_stats(up.text(), mark)}
                log(f"MESH {key} c=16: {m['output_throughput']:.0f} tok/s, TPOT {m['median_tpot_ms']:.1f} ms, "
                    f"TTFT {m['median_ttft_ms']:.0f} ms, failed {m['failed']}")
        except Exception as exc:  # noqa: BLE001 - recorded; the next layout still runs
            res["error"] = repr(exc)[:2000]
            log(f"MESH {key}: {exc!r}"[:2000])
        finally:
            res["stop_rc"] = up.stop()
            (out / f"mesh-{key}.log").write_text(up.text()[-200_000:])
        (out / f"mesh-{key}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
