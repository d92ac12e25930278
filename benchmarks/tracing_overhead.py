"""TPOT with tracing off vs on (OTLP to a local receiver, an event per token), 32 concurrent
streams, CPU, embedded model. Alternates off/on/off/on meshes so drift shows; writes JSON + a line.
Usage: python benchmarks/tracing_overhead.py --out results/cpu/tracing-overhead.json"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.meshproc import Mesh, OtlpReceiver  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


def run(mesh: Mesh, batch: int, tokens: int) -> dict:
    client = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x", max_retries=0, timeout=300)

    def one(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        stamps = []
        for c in client.completions.create(model=MODEL, prompt=f"Request {i}: tell a story about", max_tokens=tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}):
            if c.choices and c.choices[0].text:
                stamps.append(time.perf_counter())
        return stamps[0] - t0, (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)

    one(0)  # warm-up
    with cf.ThreadPoolExecutor(batch) as ex:
        res = list(ex.map(one, range(batch)))
    return {"ttft_median_s": statistics.median(r[0] for r in res), "tpot_median_s": statistics.median(r[1] for r in res)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tracing-overhead.json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    sink = OtlpReceiver()
    env_on = sink.env
    rows = []
    for mode in ("off", "on", "off", "on"):
        mesh = Mesh(Path(tempfile.mkdtemp()), env=env_on if mode == "on" else {"OTEL_TRACES_EXPORTER": "none"})
        try:
            r = run(mesh, a.batch, a.tokens)
        finally:
            mesh.stop()
        r["tracing"] = mode
        rows.append(r)
        print(json.dumps(r), flush=True)
    off = statistics.mean(r["tpot_median_s"] for r in rows if r["tracing"] == "off")
    on = statistics.mean(r["tpot_median_s"] for r in rows if r["tracing"] == "on")
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()} {platform.node()}, "
           f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "command": " ".join(sys.argv), "batch": a.batch, "tokens": a.tokens, "runs": rows,
           "tpot_off_s": off, "tpot_on_s": on, "ratio_on_over_off": on / off, "spans_received": len(sink.spans)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"TPOT tracing off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms, ratio {on / off:.3f} ({len(sink.spans)} spans exported)")
    sink.stop()


if __name__ == "__main__":
    main()
