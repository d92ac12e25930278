"""Tables from ``benchmarks/gpu_pd_vs_colocated.py``'s result files: per layout and concurrency,
raw output throughput and goodput under TPOT SLOs with and without a P99 inter-token-latency SLO,
recomputed from every request's own figures (the ``requests`` records of ``pdmesh bench``).

    python3 benchmarks/gpu_pd_report.py RESULTS_DIR [--shape 3500_1500] > table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pdmesh.bench.metrics import percentile

SLOS = [("TPOT 20", {"tpot_ms": 20.0}), ("TPOT 35", {"tpot_ms": 35.0}),
        ("TPOT 20 + P99 ITL 40", {"tpot_ms": 20.0, "p99_itl_ms": 40.0}),
        ("TPOT 35 + P99 ITL 40", {"tpot_ms": 35.0, "p99_itl_ms": 40.0})]


def goodput(records: list[dict], slo: dict[str, float], duration: float) -> float:
    """Requests per second that succeeded and met every limit of ``slo``."""
    good = sum(1 for r in records if r["ok"] and all((r.get(k) or 0.0) <= v for k, v in slo.items()))
    return good / duration if duration > 0 else 0.0


def rows(folder: Path, shape: str) -> list[dict]:
    out = []
    for f in sorted(folder.glob(f"pd-{shape}-*-c*.json")):
        doc = json.loads(f.read_text())
        pt = doc["points"][0]
        m, recs = pt["metrics"], pt["requests"]
        row = {"layout": doc["layout"], "concurrency": doc["concurrency"], "requests": len(recs),
               "tok_s": m["output_throughput"], "ttft_p50": m["median_ttft_ms"], "ttft_p99": m["p99_ttft_ms"],
               "tpot_p50": m["median_tpot_ms"], "req_p99_itl_p50": percentile([r["p99_itl_ms"] for r in recs if r["ok"]], 50),
               "pull": doc.get("pull_ms")}
        for name, slo in SLOS:
            row[name] = goodput(recs, slo, m["duration_s"])
        out.append(row)
    return sorted(out, key=lambda r: (r["layout"] != "disagg", r["layout"], r["concurrency"]))


def report(folder: Path, shape: str) -> str:
    """The markdown tables of one shape's points under ``folder``."""
    rs = [r for r in rows(folder, shape) if r["concurrency"] > 1]
    head = ["layout", "conc", "reqs", "out tok/s", "TTFT p50/p99 ms", "TPOT p50 ms", "req P99 ITL p50 ms"] + [n for n, _ in SLOS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rs:
        cells = [r["layout"], str(r["concurrency"]), str(r["requests"]), f"{r['tok_s']:.0f}",
                 f"{r['ttft_p50']:.0f} / {r['ttft_p99']:.0f}", f"{r['tpot_p50']:.1f}", f"{r['req_p99_itl_p50']:.1f}"]
        cells += [f"{r[n]:.3f}" for n, _ in SLOS]
        lines.append("| " + " | ".join(cells) + " |")
    pulls = [r for r in rows(folder, shape) if r["pull"]] + [r for r in rows(folder, shape.split("_")[0] + "_32") if r["pull"]]
    if pulls:
        lines += ["", "KV pulls (wall: from the copy's launch by the engine until the engine saw it done, between steps; "
                  "gpu: the copy itself, CUDA events)", "",
                  "| layout | conc | pulls | wall median / p99 / max ms | gpu median / p99 / max ms |", "|---|---|---|---|---|"]
        for r in sorted(pulls, key=lambda r: r["concurrency"]):
            cells = [f"{p['median']:.2f} / {p['p99']:.2f} / {p['max']:.2f}" if p else "-"
                     for p in (r["pull"].get("wall"), r["pull"].get("gpu"))]
            n = (r["pull"].get("wall") or {}).get("n", 0)
            lines.append(f"| {r['layout']} | {r['concurrency']} | {n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--shape", default="3500_1500")
    a = ap.parse_args()
    print(report(Path(a.folder), a.shape))


if __name__ == "__main__":
    main()
