"""Combine ``gpu_serving.py`` result files into one report: a table per shape, the stack's
own cost, the disaggregation TTFT overhead, goodput ratios against the goals, and plots.

    python benchmarks/gpu_serving_report.py DIR [--plot-dir DIR]   (reads DIR/serving-*.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOALS = {"stack_overhead_c1": 1.10, "stack_overhead_c64": 1.05, "ttft_overhead_frac": 0.05,
         "goodput_ratio_2gpu": 1.2, "goodput_ratio_1gpu": 0.95}


def load(d: Path) -> dict[tuple[str, int], dict]:
    docs = {}
    for f in sorted(d.glob("serving-*.json")):
        doc = json.loads(f.read_text())
        docs[(doc["layout"], doc["input_len"])] = doc | {"_file": str(f)}
    return docs


def point(doc: Optional[dict], conc: int) -> Optional[dict]:
    for pt in (doc or {}).get("points", []):
        if pt["max_concurrency"] == conc:
            return pt
    return None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def derive(docs: dict) -> dict:
    out: dict = {"stack_overhead": [], "ttft_overhead": [], "goodput": []}
    for (lay, in_len), doc in sorted(docs.items()):
        for conc, goal in ((1, GOALS["stack_overhead_c1"]), (64, GOALS["stack_overhead_c64"])):
            pt = point(doc, conc)
            w = pt["worker"] if pt else {}
            if w.get("token_weighted_step_ms"):
                # denominator: the worker's own time per step, as its output tokens saw it (steps
                # weighted by the tokens they sampled; decode and mixed steps)
                r = ratio(pt["metrics"]["median_tpot_ms"], w["token_weighted_step_ms"])
                out["stack_overhead"].append({"layout": lay, "input_len": in_len, "concurrency": conc,
                                              "client_median_tpot_ms": pt["metrics"]["median_tpot_ms"],
                                              "client_mean_tpot_ms": pt["metrics"]["mean_tpot_ms"],
                                              "token_weighted_step_ms": w["token_weighted_step_ms"],
                                              "mean_decode_step_ms": w["mean_decode_step_ms"],
                                              "mixed_steps": w["mixed_steps"], "ratio": r,
                                              "ratio_to_mean_decode_step": ratio(pt["metrics"]["median_tpot_ms"], w["mean_decode_step_ms"]),
                                              "goal": goal, "met": r is not None and r <= goal})
    for g in (1, 2):
        for in_len in sorted({k[1] for k in docs}):
            dis, col = docs.get((f"disagg-{g}gpu", in_len)), docs.get((f"colocated-{g}gpu", in_len))
            if not dis or not col:
                continue
            pd_, pc = point(dis, 1), point(col, 1)
            if pd_ and pc and pd_["worker"].get("mean_prefill_time_ms"):
                diff = pd_["metrics"]["median_ttft_ms"] - pc["metrics"]["median_ttft_ms"]
                frac = diff / pd_["worker"]["mean_prefill_time_ms"]
                out["ttft_overhead"].append({"gpus": g, "input_len": in_len, "ttft_disagg_ms": pd_["metrics"]["median_ttft_ms"],
                                             "ttft_colocated_ms": pc["metrics"]["median_ttft_ms"], "diff_ms": diff,
                                             "prefill_time_ms": pd_["worker"]["mean_prefill_time_ms"], "fraction": frac,
                                             "goal": GOALS["ttft_overhead_frac"], "met": frac <= GOALS["ttft_overhead_frac"]})
            for slo in ("tpot35", "tpot40"):
                key = f"request_goodput_{slo}"
                best_d = max(pt["metrics"][key] for pt in dis["points"])
                best_c = max(pt["metrics"][key] for pt in col["points"])
                per_conc = {pt["max_concurrency"]: ratio(pt["metrics"][key], (point(col, pt["max_concurrency"]) or {}).get("metrics", {}).get(key))
                            for pt in dis["points"]}
                goal = GOALS[f"goodput_ratio_{g}gpu"]
                r = ratio(best_d, best_c)
                out["goodput"].append({"gpus": g, "input_len": in_len, "slo": slo, "best_disagg_req_s": best_d,
                                       "best_colocated_req_s": best_c, "ratio": r, "ratio_per_concurrency": per_conc,
                                       "goal": goal if slo == "tpot35" else None,
                                       "met": (r is not None and r >= goal) if slo == "tpot35" else None})
    return out


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(docs: dict) -> str:
    rows = ["| layout | in:out | conc | n | req/s | out tok/s/GPU | TTFT mean/med/P99 (ms) | TPOT mean/med/P99 (ms) "
            "| ITL mean/med/P99 (ms) | E2E mean/med/P99 (s) | goodput TPOT<35 / <40 (req/s) | decode step mean / per token (ms) "
            "| prefill (ms) |",
            "|" + "---|" * 13]
    for (lay, in_len), doc in sorted(docs.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        for pt in doc["points"]:
            m, w = pt["metrics"], pt["worker"]
            trio = lambda k, s=1.0, m=m: "/".join(fmt(m[f"{p}_{k}_ms"] * s, ".1f" if s == 1.0 else ".2f")  # noqa: E731
                                              for p in ("mean", "median", "p99"))
            rows.append(f"| {lay} | {in_len}:{doc['output_len']} | {pt['max_concurrency']} | {m['completed']:.0f}"
                        f"{'' if not m['failed'] else ' (' + format(m['failed'], '.0f') + ' failed)'} | {m['request_throughput']:.2f} "
                        f"| {m['output_throughput_per_gpu']:.0f} | {trio('ttft')} | {trio('tpot')} | {trio('itl')} "
                        f"| {trio('e2el', 1e-3)} | {m['request_goodput_tpot35']:.2f} / {m['request_goodput_tpot40']:.2f} "
                        f"| {fmt(w['mean_decode_step_ms'])} / {fmt(w.get('token_weighted_step_ms'))} "
                        f"| {fmt(w['mean_prefill_time_ms'], '.1f')} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--plot-dir", default=None)
    a = p.parse_args()
    d = Path(a.dir)
    docs = load(d)
    if not docs:
        print(f"no serving-*.json under {d}", file=sys.stderr)
        return 1
    der = derive(docs)
    (d / "serving_summary.json").write_text(json.dumps(der, indent=1) + "\n")
    print(table(docs))
    print("\nstack overhead (client median TPOT / the worker's step time per output token; also / its mean decode step):")
    for r in der["stack_overhead"]:
        print(f"  {r['layout']:<15} {r['input_len']} conc {r['concurrency']:<3} {r['client_median_tpot_ms']:.2f} / "
              f"{r['token_weighted_step_ms']:.2f} ms = {fmt(r['ratio'], '.3f')} (goal <= {r['goal']}) {'met' if r['met'] else 'NOT met'}"
              f"; / mean decode step {fmt(r['mean_decode_step_ms'])} ms = {fmt(r['ratio_to_mean_decode_step'], '.3f')}")
    print("TTFT(disagg) - TTFT(colocated) at concurrency 1, as a fraction of prefill time:")
    for r in der["ttft_overhead"]:
        print(f"  {r['gpus']} GPU {r['input_len']}: {r['ttft_disagg_ms']:.1f} - {r['ttft_colocated_ms']:.1f} = {r['diff_ms']:.1f} ms "
              f"/ {r['prefill_time_ms']:.1f} ms = {r['fraction']:.3f} (goal <= {r['goal']}) {'met' if r['met'] else 'NOT met'}")
    print("goodput (best over the sweep), disaggregated / colocated:")
    for r in der["goodput"]:
        print(f"  {r['gpus']} GPU {r['input_len']} {r['slo']}: {r['best_disagg_req_s']:.2f} / {r['best_colocated_req_s']:.2f} req/s "
              f"= {fmt(r['ratio'], '.2f')}" + (f" (goal >= {r['goal']}) {'met' if r['met'] else 'NOT met'}" if r["goal"] else "")
              + f"; per concurrency {json.dumps({k: (round(v, 2) if v else v) for k, v in r['ratio_per_concurrency'].items()})}")
    if a.plot_dir:
        from pdmesh.bench.plot import main as plot_main

        for in_len in sorted({k[1] for k in docs}):
            files = [doc["_file"] for (lay, il), doc in sorted(docs.items()) if il == in_len]
            plot_main(files + ["--out", str(Path(a.plot_dir) / f"serving-{in_len}.png")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
