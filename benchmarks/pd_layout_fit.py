"""Fit ``benchmarks/pd_layout_model.py``'s costs from measured runs and set its predictions against
what the runs measured.

    python benchmarks/pd_layout_fit.py committed                 # the committed 1- and 2-GPU runs
    python benchmarks/pd_layout_fit.py run DIR [--costs-out F]   # a gpu_ratios.py output folder

Sources of measured points (one per layout, shape and concurrency):
* ``pd-IN_OUT-LAYOUT-cN.json`` (``gpu_pd_vs_colocated.py``, ``gpu_ratios.py``): ``pdmesh bench``
  per-request records, so goodput is recomputed at every SLO of the model (``gpu_pd_report.goodput``);
  ``gpu_ratios.py``'s also hold every worker's metrics over the point (``workers``).
* ``serving-LAYOUT-IN_OUT.json`` (``gpu_serving.py``): client metrics and the workers' figures per
  point, goodput under TPOT 35 and 40 ms only (no per-request records).

Costs from workers' metrics (``costs_from_workers``): decode points (mean batch = tokens sampled in
decode steps / decode steps, context I + O/2, mean decode step) from decode and colocated workers
with a GPU of their own; prefill points (I, prefill step time / prompts) from prefill workers with a
GPU of their own; ``overhead_ms`` = median over disaggregated points of (fastest TTFT, or the median
TTFT at concurrency 1) - s(I); ``chunk_overhead`` = colocated prefill GPU time (mixed steps minus the
decode step they carry, plus prefill-only steps) / (prompts x s(I)).
Costs from client records only (``costs_from_client``, for runs without worker metrics): s and o from
the TTFTs of a 1P1D burst sorted by rank (TTFT_k = o + (k+1)*s), decode from the TPOT alone (batch 1)
and the burst's median TPOT at its mean batch (``burst_mean_batch``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_pd_report import goodput  # noqa: E402
from benchmarks.pd_layout_model import (SLO, SLOS, Costs, Layout, Workload, burst_mean_batch, fit_decode, fit_nonneg,  # noqa: E402
                                        fit_prefill, percentile, predict)

LEGACY = {"disagg": "1P1D", "disagg-2gpu": "1P1D", "disagg-1gpu": "1P1D-1gpu", "colocated-1gpu": "1C", "colocated-2gpu": "2C"}
"""Layout names of the 2-GPU scripts (gpu_pd_vs_colocated.py: 'colocated-CHUNK' is 2 replicas)."""
METRICS = (("output_throughput", "out tok/s", 0), ("ttft_p50", "TTFT p50", 0), ("ttft_p99", "TTFT p99", 0),
           ("tpot_p50", "TPOT p50", 1), ("p99_itl_p50", "req P99 ITL p50", 1))


def layout_of(name: str, chunk: int = 2048) -> Layout:
    if name.startswith("colocated-") and name[10:].isdigit():
        return Layout(colocated=2, chunk=int(name[10:]))
    return Layout.parse(LEGACY.get(name, name), chunk)


def slo_dict(slo: SLO) -> dict[str, float]:
    return {"tpot_ms": slo.tpot_ms, **({"p99_itl_ms": slo.p99_itl_ms} if slo.p99_itl_ms is not None else {})}


def slo_named(name: str) -> SLO:
    """'TPOT 35' or 'TPOT 20 + P99 ITL 40' (``SLO.name``) back to the SLO."""
    words = name.split()
    return SLO(float(words[1]), float(words[-1]) if "ITL" in words else None)


def pd_point(path: Path) -> dict:
    """A measured point from a ``pd-*.json`` file (per-request records)."""
    doc = json.loads(path.read_text())
    pt = doc["points"][0]
    m, recs = pt["metrics"], pt["requests"]
    ok = [r for r in recs if r["ok"]]
    lay = layout_of(doc["layout"], doc.get("chunk", 2048))
    return {"file": path.name, "layout": lay, "input_len": round(doc["mean_input_len"]), "output_len": round(doc["mean_output_len"]),
            "concurrency": doc["concurrency"], "num_prompts": len(recs), "workers": list(doc.get("workers", {}).values()),
            "ttfts": sorted(r["ttft_ms"] for r in ok),
            "measured": {"output_throughput": m["output_throughput"], "ttft_p50": m["median_ttft_ms"], "ttft_p99": m["p99_ttft_ms"],
                         "tpot_p50": m["median_tpot_ms"], "p99_itl_p50": percentile([r["p99_itl_ms"] for r in ok], 50),
                         "goodput": {s.name: goodput(recs, slo_dict(s), m["duration_s"]) for s in SLOS}}}


def serving_points(path: Path) -> list[dict]:
    """Measured points from a ``serving-*.json`` file (gpu_serving.py: no per-request records)."""
    doc = json.loads(path.read_text())
    out = []
    for pt in doc["points"]:
        m = pt["metrics"]
        out.append({"file": path.name, "layout": layout_of(doc["layout"]), "input_len": doc["input_len"], "output_len": doc["output_len"],
                    "concurrency": pt["max_concurrency"], "num_prompts": int(m["completed"] + m["failed"]), "workers": [pt["worker"]],
                    "ttfts": [],
                    "measured": {"output_throughput": m["output_throughput"], "ttft_p50": m["median_ttft_ms"], "ttft_p99": m["p99_ttft_ms"],
                                 "tpot_p50": m["median_tpot_ms"], "p99_itl_p50": None,
                                 "goodput": {"TPOT 35": m["request_goodput_tpot35"], "TPOT 40": m["request_goodput_tpot40"]}}})
    return out


def _ctx(p: dict) -> float:
    return p["input_len"] + p["output_len"] / 2


def costs_from_workers(points: list[dict], max_batch: int = 128) -> tuple[Costs, dict]:
    """Costs from the workers' own step figures (see the module docstring); also the points used."""
    dec, pre, colo = [], [], []
    for p in points:
        lay = p["layout"]
        if lay.shared_gpu:  # two processes time-slice one GPU: their steps are not a GPU's own costs
            continue
        for w in p["workers"]:
            if w.get("decode_steps") and w.get("mean_decode_step_ms"):
                dec.append((w["decode_step_tokens"] / w["decode_steps"], _ctx(p), w["mean_decode_step_ms"]))
            if not lay.colocated and w.get("prefill_steps") and w.get("prefill_step_tokens"):
                pre.append((p["input_len"], w["prefill_steps"] * w["mean_prefill_step_ms"] / w["prefill_step_tokens"]))
            if lay.colocated and (w.get("mixed_steps") or w.get("prefill_steps")):
                colo.append((p, w))
    if not dec or not pre:
        raise ValueError(f"costs: {len(dec)} decode and {len(pre)} prefill measurements: need both (a disaggregated layout's workers)")
    d, s = fit_decode(dec), fit_prefill(pre)
    base = Costs(**d, **s, max_batch=max_batch)
    over = []
    for p in points:
        if not p["layout"].colocated and not p["layout"].shared_gpu:
            first = p["ttfts"][0] if p["ttfts"] else p["measured"]["ttft_p50"] if p["concurrency"] == 1 else None
            if first is not None:
                over.append(max(first - base.prefill_ms(p["input_len"]), 0.0))
    gpu, ideal = 0.0, 0.0
    for p, w in colo:
        mixed_b = w["mixed_step_tokens"] / w["mixed_steps"] if w.get("mixed_steps") else 0.0
        gpu += (w.get("mixed_steps") or 0) * ((w.get("mean_mixed_step_ms") or 0.0) - base.step_ms(mixed_b, _ctx(p)))
        gpu += (w.get("prefill_steps") or 0) * (w.get("mean_prefill_step_ms") or 0.0)
        ideal += w.get("prompts", p["num_prompts"]) * base.prefill_ms(p["input_len"])
    phi = max(gpu / ideal, 0.5) if ideal > 0 and gpu > 0 else 1.0
    c = Costs(**d, **s, overhead_ms=statistics.median(over) if over else 0.0, chunk_overhead=phi, max_batch=max_batch)
    return c, {"decode_points": dec, "prefill_points": pre, "overhead_points": over, "colocated_points": len(colo)}


def costs_from_client(alone: dict, burst: dict, max_batch: int = 128) -> tuple[Costs, dict]:
    """Costs from a 1P1D mesh's client records only: a request alone and a burst (see the docstring)."""
    if burst["layout"] != Layout(1, 1) or not burst["ttfts"]:
        raise ValueError("costs_from_client: the burst must be a 1P1D point with per-request records")
    t = burst["ttfts"]
    fit = fit_nonneg([(1.0, k + 1.0) for k in range(len(t))], t, ("overhead_ms", "s"))
    s = fit["s"]
    window = (burst["output_len"] - 1) * burst["measured"]["tpot_p50"]
    dec = [(1.0, _ctx(alone), alone["measured"]["tpot_p50"]),
           (burst_mean_batch(len(t), s, window), _ctx(burst), burst["measured"]["tpot_p50"])]
    c = Costs(**fit_decode(dec), **fit_prefill([(burst["input_len"], s)]), overhead_ms=fit["overhead_ms"], max_batch=max_batch)
    return c, {"decode_points": dec, "prefill_points": [(burst["input_len"], s)], "overhead_points": [fit["overhead_ms"]]}


def compare(points: list[dict], costs: Costs, calibration: tuple[str, ...] = ()) -> list[dict]:
    """Predicted against measured for every point (``calibration``: files whose figures fed the costs)."""
    rows = []
    for p in sorted(points, key=lambda p: (p["input_len"], p["layout"].name, p["concurrency"])):
        slos = [slo_named(n) for n in p["measured"]["goodput"]]
        pred = predict(p["layout"], Workload(p["input_len"], p["output_len"], p["concurrency"], p["num_prompts"]), costs, slos)
        pm = {"output_throughput": pred.output_throughput, "ttft_p50": pred.percentile("ttft_ms", 50),
              "ttft_p99": pred.percentile("ttft_ms", 99), "tpot_p50": pred.percentile("tpot_ms", 50),
              "p99_itl_p50": pred.percentile("p99_itl_ms", 50), "goodput": pred.goodput}
        rows.append({"point": p, "predicted": pm, "busy": pred.busy, "calibration": p["file"] in calibration})
    return rows


def err(pred: Optional[float], meas: Optional[float]) -> Optional[float]:
    return None if pred is None or meas is None or meas == 0 else (pred - meas) / meas * 100.0


def table(rows: list[dict]) -> str:
    """Markdown: each metric as measured / predicted (error %), goodput per SLO the same way."""
    slos = list(dict.fromkeys(n for r in rows for n in r["point"]["measured"]["goodput"]))
    head = ["layout", "in:out", "conc", "reqs"] + [label for _, label, _ in METRICS] + [f"goodput {n}" for n in slos]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p, m, pr = r["point"], r["point"]["measured"], r["predicted"]
        cells = [p["layout"].name + (f" c{p['layout'].chunk}" if p["layout"].colocated else "") + (" (fit)" if r["calibration"] else ""),
                 f"{p['input_len']}:{p['output_len']}", str(p["concurrency"]), str(p["num_prompts"])]
        for key, _, dec in METRICS:
            e = err(pr[key], m[key])
            cells.append("-" if m[key] is None else f"{m[key]:.{dec}f} / {pr[key]:.{dec}f} ({e:+.0f}%)")
        for n in slos:
            mv, pv = m["goodput"].get(n), pr["goodput"].get(n)
            cells.append("-" if mv is None else f"{mv:.2f} / {pv:.2f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def error_summary(rows: list[dict]) -> str:
    """Median and largest |error| per metric over the points not used for the fit."""
    lines = []
    for key, label, _ in METRICS:
        es = [abs(e) for r in rows if not r["calibration"] for e in [err(r["predicted"][key], r["point"]["measured"][key])] if e is not None]
        if es:
            lines.append(f"{label}: median |error| {statistics.median(es):.0f}%, largest {max(es):.0f}% ({len(es)} points)")
    g = [(r["point"]["measured"]["goodput"][n], r["predicted"]["goodput"][n]) for r in rows if not r["calibration"]
         for n in r["point"]["measured"]["goodput"]]
    if g:
        lines.append(f"goodput: |predicted - measured| median {statistics.median(abs(a - b) for a, b in g):.2f} req/s over {len(g)} "
                     f"(point, SLO) pairs; both zero or both non-zero in {sum(1 for a, b in g if (a > 0) == (b > 0))}")
    return "\n".join("- " + x for x in lines)


def costs_text(c: Costs, used: dict) -> str:
    lens = sorted({int(i) for i, _ in used["prefill_points"]}, reverse=True)
    return (f"decode step T_d(B, L) = {c.alpha_ms:.3f} + {c.per_seq_ms:.4f}*B + {c.per_kv_token_ms:.3e}*B*L ms; "
            f"prefill s(I) = {c.prefill_per_token_ms:.4e}*I + {c.prefill_per_token2_ms:.3e}*I^2 ms "
            f"({', '.join(f's({i}) = {c.prefill_ms(i):.1f} ms' for i in lens)}); overhead o = {c.overhead_ms:.1f} ms; "
            f"colocated chunk overhead phi = {c.chunk_overhead:.2f}; from {len(used['decode_points'])} decode and "
            f"{len(used['prefill_points'])} prefill measurements")


def committed(costs_out: Optional[Path] = None) -> str:
    """The check against the committed 1- and 2-GPU runs, as markdown (``costs_out``: write the
    c86b1ed llama-3.1-8b costs there, for ``pd_layout_model.py --costs``)."""
    gpu = ROOT / "results" / "gpu"
    out = []
    up = gpu / "2026-11-30-h200x2-up"
    pts = [pd_point(f) for f in sorted(up.glob("pd-3500_*-c*.json"))]
    alone = next(p for p in pts if p["concurrency"] == 1)
    burst = next(p for p in pts if p["layout"] == Layout(1, 1) and p["concurrency"] == 32 and p["output_len"] == 1500)
    c, used = costs_from_client(alone, burst)
    if costs_out is not None:
        costs_out.write_text(json.dumps({"costs": c.__dict__, "source": "results/gpu/2026-11-30-h200x2-up, commit c86b1ed, "
                                         "llama-3.1-8b dummy bf16 on H200 (pd_layout_fit.py committed)", "used": used}, indent=1) + "\n")
    rows = compare([p for p in pts if p["concurrency"] > 1], c, (burst["file"],))
    out += ["### 2 x H200, commit c86b1ed, 3500:1500, one wave per point (`results/gpu/2026-11-30-h200x2-up/pd-*.json`)", "",
            "Costs from the 1P1D mesh's client records only (its request alone, 3500:32, and the TTFTs and median TPOT of "
            "its concurrency-32 burst, marked (fit)): " + costs_text(c, used) + ".", "", table(rows), "", error_summary(rows), ""]
    phi = Costs(**{**c.__dict__, "chunk_overhead": 1.3})
    out += ["The colocated rows again with a chunked prefill costing 1.3x a dedicated one (phi = 1.30, what the ee2846e "
            "workers' metrics give below; this run has no colocated worker metrics):", "",
            table(compare([p for p in pts if p["layout"].colocated], phi)), ""]
    doc = json.loads((up / "up-63f621f.json").read_text())
    lb = doc["load_bench"]
    other = {"file": "up-63f621f.json", "layout": Layout(1, 1), "input_len": 3500, "output_len": doc.get("load_output", 256),
             "concurrency": 64, "num_prompts": 128, "workers": [], "ttfts": [],
             "measured": {"output_throughput": lb["output_throughput"], "ttft_p50": lb["median_ttft_ms"], "ttft_p99": None,
                          "tpot_p50": lb["median_tpot_ms"], "p99_itl_p50": None, "goodput": {}}}
    out += ["Another commit (63f621f, `up-63f621f.json`'s load point: 3500:256, concurrency 64, 128 requests: two waves), "
            "predicted with the c86b1ed costs:", "", table(compare([other], c)), ""]
    serving = gpu / "2026-11-22-h200x2-serving"
    spts = [p for f in sorted(serving.glob("serving-*.json")) for p in serving_points(f)]
    c2, used2 = costs_from_workers(spts)
    rows2 = compare(spts, c2)
    out += ["### 2 x H200, commit ee2846e, 3500:256 and 2500:256, 2 x concurrency requests (`results/gpu/2026-11-22-h200x2-serving/`)", "",
            "Costs from the workers' step figures of the same runs (decode steps of 1P1D and colocated workers, prefill "
            "steps of the 1P1D prefill worker, fastest TTFT at concurrency 1; the 1-GPU layouts' shared-GPU steps are not used): "
            + costs_text(c2, used2) + ". Goodput is under TPOT 35 / 40 ms (these files keep no per-request records).", "",
            table(rows2), "", error_summary(rows2), ""]
    return "\n".join(out)


def run_dir(folder: Path, costs_out: Optional[Path]) -> str:
    """A gpu_ratios.py output folder: costs from its workers' metrics, predictions against its points."""
    pts = [pd_point(f) for f in sorted(folder.glob("pd-*-c*.json"))]
    if not pts:
        raise ValueError(f"no pd-*-c*.json under {folder}")
    c, used = costs_from_workers(pts)
    if costs_out is not None:
        costs_out.write_text(json.dumps({"costs": c.__dict__, "used": used}, indent=1) + "\n")
    rows = compare(pts, c)
    return "\n".join(["Costs: " + costs_text(c, used) + ".", "", table(rows), "", error_summary(rows)])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Fit the PD layout model's costs and check its predictions.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cm = sub.add_parser("committed", help="the committed 1- and 2-GPU runs under results/gpu")
    cm.add_argument("--costs-out", default=None, help="write the c86b1ed costs (JSON) here")
    r = sub.add_parser("run", help="a gpu_ratios.py output folder")
    r.add_argument("folder")
    r.add_argument("--costs-out", default=None)
    a = ap.parse_args(argv)
    try:
        out = Path(a.costs_out) if a.costs_out else None
        print(committed(out) if a.cmd == "committed" else run_dir(Path(a.folder), out))
    except (OSError, ValueError, KeyError) as exc:
        print(f"pd_layout_fit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
