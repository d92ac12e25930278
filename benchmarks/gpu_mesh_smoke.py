"""The whole mesh (scheduler, prefill, decode, gateway: 4 processes) on one GPU with a dummy preset,
driven through the gateway by the openai client. Prints one JSON line of what it saw."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.meshproc import Mesh  # noqa: E402


def main() -> None:
    model, tok = sys.argv[1], sys.argv[2]
    tmp = Path(tempfile.mkdtemp())
    mesh = Mesh(tmp, extra=["--model", model, "--load-format", "dummy", "--tokenizer", tok, "--max-model-len", "4096"],
                worker_args="--gpu-memory-utilization 0.3 --max-num-seqs 32")
    out: dict = {"model": model}
    try:
        ws = mesh.workers()
        out["workers"] = [(w.info.worker_id, list(w.info.transports), w.info.device_index) for w in ws]
        client = openai.OpenAI(base_url=mesh.base + "/v1", api_key="x", max_retries=0, timeout=120)
        ttfts, texts = [], []
        for i in range(6):
            t0 = time.perf_counter()
            first = None
            n = 0
            for _chunk in client.completions.create(model=model, prompt=[(i * 31 + j) % 5000 + 10 for j in range(1500)],
                                               max_tokens=64, temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if first is None:
                    first = time.perf_counter() - t0
                n += 1
            ttfts.append(first)
            texts.append(n)
        out["ttft_ms_median"] = statistics.median(ttfts) * 1e3
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=16)
        out["chat_completion_tokens"] = r.usage.completion_tokens
        out["stream_chunks"] = texts
        log = mesh.proc.log_path.read_text(errors="replace")
        out["cuda_ipc_handle_opened"] = "opened cuda_ipc peer" in log
        out["idle_after"] = bool(mesh.wait_idle(timeout=20))
    finally:
        out["stop_rc"] = mesh.stop()
        out["orphans"] = mesh.service_pids()
    print("MESH " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
