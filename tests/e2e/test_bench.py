"""pdmesh bench, for a few seconds, against the live mesh (embedded default model, CPU)."""

import json
import subprocess
import sys


def _bench(mesh, tmp_path, *args):
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--base-url", mesh.base, "--no-progress",
                        "--result-file", str(out), *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(out.read_text()), p.stdout


def test_bench_sweep_against_the_mesh_and_plot(mesh, tmp_path):
    doc, stdout = _bench(mesh, tmp_path, "--dataset", "random", "--num-prompts", "6", "--random-input-len", "40",
                         "--random-output-len", "8", "--max-concurrency", "1", "3", "--num-warmups", "1",
                         "--goodput", "tpot:60000", "--label", "cpu-mesh")
    assert len(doc["points"]) == 2 and doc["mean_input_len"] == 40
    for pt in doc["points"]:
        m = pt["metrics"]
        assert m["completed"] == 6 and m["failed"] == 0, pt
        assert m["total_input_tokens"] == 240 and m["total_output_tokens"] == 48  # exact: token ids + ignore_eos
        assert 0 < m["median_ttft_ms"] <= m["median_e2el_ms"] and m["median_tpot_ms"] > 0 and m["median_itl_ms"] > 0
        assert m["request_goodput"] == m["request_throughput"]  # a 60 s TPOT SLO: every request meets it
        reqs = pt["requests"]  # one record per request: goodput can be recomputed at any SLO later
        assert len(reqs) == 6 and all(r["ok"] and r["input_tokens"] == 40 and r["output_tokens"] == 8 for r in reqs)
        assert all(0 < r["ttft_ms"] <= r["e2el_ms"] and 0 < r["p99_itl_ms"] <= r["max_itl_ms"] for r in reqs)
    assert "Time per Output Token" in stdout and "Successful requests" in stdout
    png = tmp_path / "plot.png"
    p = subprocess.run([sys.executable, "-m", "services.cli", "bench", "plot", str(tmp_path / "result.json"),
                        "--out", str(png)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_chat_endpoint_and_request_rate(mesh, tmp_path):
    doc, _ = _bench(mesh, tmp_path, "--endpoint", "chat", "--num-prompts", "4", "--random-input-len", "24",
                    "--random-output-len", "6", "--request-rate", "20", "--num-warmups", "0")
    m = doc["points"][0]["metrics"]
    assert doc["points"][0]["request_rate"] == 20.0 and m["completed"] == 4 and m["total_output_tokens"] == 24
