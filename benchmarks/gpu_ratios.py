"""Prefill:decode ratios on N GPUs against N colocated replicas (issue 24), through ``pdmesh up`` as
users run it, and the layout model (``benchmarks/pd_layout_model.py``) set against what was measured.
On the 4-GPU machine (``benchmarks/gpu_ratios.sh`` wraps it):

    python3 benchmarks/gpu_ratios.py --out $OUT --budget 540 [--models llama-3.1-8b qwen3-32b]
        [--layouts 1P3D 2P2D 3P1D 4C] [--shapes 3500:1500 2500:1500] [--concurrency 32 64 128 256 512]

Layouts: ``xPyD`` is ``pdmesh up --prefill x --decode y`` (default placement: prefill workers on
GPUs 0..x-1, decode workers on the others); ``NC`` is N colocated replicas, ``pdmesh up --prefill 0
--decode 0 --colocated N --colocated-args "--max-num-batched-tokens CHUNK"`` (``--chunk``, 2048: the
best of 2048/1024 on two GPUs). Dummy weights, bf16, a synthetic tokenizer over the preset's
vocabulary, random token-id prompts, ``ignore_eos``.

Per model: reference tokens from one engine on cuda:0 (two prompts of the first shape's input length,
48 greedy tokens; ``--reference-dir`` keeps them for a later call). Per layout: one mesh, whose
tokens must equal the reference before any load (``gpu_pd_vs_colocated.checked_mesh``); then per
shape a concurrency sweep, ascending, that stops at the first point where the layout misses the
loosest TPOT SLO (median TPOT over ``--stop-tpot``, 35 ms). A point is ``pdmesh bench`` with
``--waves`` x concurrency requests (1: one wave, all sent at once, as the 2-GPU run) written to
``OUT/MODEL/pd-IN_OUT-LAYOUT-cC.json``: per-request records (goodput at any SLO), every worker's
metrics over the point and its busy share (engine step time / the point's duration), KV pulls.

Budget: ``--budget`` seconds for the whole run. Before each mesh and each point the script estimates
its time (a mesh: the slowest start so far, 150 s before any; a point: the layout model's predicted
duration, with the costs fitted from the points measured so far or, before any, the committed 2-GPU
run's scaled to the model's size, x 1.5 + 15 s) and skips what does not fit, saying so (a log line
and ``skipped`` in ``OUT/ratios-summary.json``).

At the end, per model: the costs fitted from its workers' metrics and the model's predictions against
every point (``OUT/MODEL/model-vs-measured.md``, ``costs.json``), with its choice of layout per shape
and SLO; the measured tables per shape (``OUT/MODEL/table-IN_OUT.md``, ``gpu_pd_report``).

``--cpu-smoke`` checks the orchestration on a CPU host: smollm2-135m (dummy, fp32, one thread per
worker), layouts 1P1D and 2C on "2 GPUs", shapes 48:6 and 32:6, concurrency 2 and 4, --stop-tpot 200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_pd_report import report  # noqa: E402
from benchmarks.gpu_pd_vs_colocated import checked_mesh, log, measure, mesh_args, reference_tokens  # noqa: E402
from benchmarks.gpu_up import Up, prompt  # noqa: E402
from benchmarks.pd_layout_fit import compare, costs_from_client, costs_from_workers, costs_text, error_summary, pd_point, table  # noqa: E402
from benchmarks.pd_layout_model import SLOS, Costs, Layout, Workload, choose, predict  # noqa: E402
from benchmarks.synthetic_tokenizer import write as write_tokenizer  # noqa: E402


def prior_costs(model: str) -> Costs:
    """Costs before anything is measured: the committed 2-GPU llama-3.1-8b run's (client records),
    scaled to ``model`` (weights for the fixed step part and prefill, KV bytes per token for the rest)."""
    from pdmesh.models.arch import arch_from_hf_config
    from pdmesh.models.presets import PRESETS

    up = ROOT / "results" / "gpu" / "2026-11-30-h200x2-up"
    alone = pd_point(up / "pd-3500_32-disagg-c1.json")
    base, _ = costs_from_client(alone, pd_point(up / "pd-3500_1500-disagg-c32.json"))

    def size(name: str) -> tuple[float, float]:
        a = arch_from_hf_config(PRESETS[name])
        return float(a.num_parameters()), float(a.num_layers * a.num_kv_heads * a.head_dim)

    (w0, kv0), (w1, kv1) = size("llama-3.1-8b"), size(model)
    return Costs(**{**base.__dict__, "alpha_ms": base.alpha_ms * w1 / w0, "per_kv_token_ms": base.per_kv_token_ms * kv1 / kv0,
                    "prefill_per_token_ms": base.prefill_per_token_ms * w1 / w0})


class Budget:
    """Seconds left of ``--budget``; what was skipped for lack of them."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, what: str, need: float) -> bool:
        if need <= self.left():
            return True
        self.skipped.append(f"{what}: needs ~{need:.0f} s, {max(self.left(), 0):.0f} s left")
        log(f"skipped {self.skipped[-1]}")
        return False


def up_flags(lay: Layout) -> list[str]:
    if lay.colocated:
        return ["--prefill", "0", "--decode", "0", "--colocated", str(lay.colocated),
                "--colocated-args", f"--max-num-batched-tokens {lay.chunk}"]
    return ["--prefill", str(lay.prefill), "--decode", str(lay.decode)]


def current_costs(folder: Path, prior: Costs) -> Costs:
    """Costs fitted from the points measured so far (the prior until a disaggregated point exists)."""
    pts = [pd_point(f) for f in sorted(folder.glob("pd-*-c*.json"))]
    try:
        return costs_from_workers(pts)[0] if pts else prior
    except ValueError:
        return prior


def sweep(up: Up, lay: Layout, model: str, tok_dir: Path, folder: Path, a, budget: Budget, prior: Costs, summary: dict) -> None:
    """Every shape's concurrency sweep on one mesh (see the module docstring)."""
    for shape in a.shapes:
        inp, out = (int(x) for x in shape.split(":"))
        for conc in sorted(a.concurrency):
            n = max(conc, round(conc * a.waves))
            guess = predict(lay, Workload(inp, out, conc, n), current_costs(folder, prior), SLOS[:1]).duration_s
            if not budget.fits(f"{model} {lay.name} {shape} c={conc}", guess * 1.5 + 15):
                break
            t0 = time.monotonic()
            path = folder / f"pd-{inp}_{out}-{lay.name}-c{conc}.json"
            doc = measure(up, lay.name, tok_dir, inp, out, conc, n, path,
                          {"commit": a.commit, "machine": a.machine, "model": model, "chunk": lay.chunk, "gpus": a.gpus})
            m = doc["points"][0]["metrics"]
            wall = time.monotonic() - t0
            summary["points"].append({"model": model, "layout": lay.name, "shape": shape, "concurrency": conc, "prompts": n,
                                      "wall_s": round(wall, 1), "predicted_s": round(guess, 1),
                                      "output_throughput": m["output_throughput"], "median_tpot_ms": m["median_tpot_ms"],
                                      "median_ttft_ms": m["median_ttft_ms"], "failed": m["failed"],
                                      "busy": {w: round(b, 3) for w, b in doc["busy"].items()}})
            log(f"{model} {lay.name} {shape} c={conc}: {m['output_throughput']:.0f} tok/s, TPOT {m['median_tpot_ms']:.1f} ms, "
                f"TTFT {m['median_ttft_ms']:.0f} ms, failed {m['failed']}, {wall:.0f} s (model said {guess:.0f} s), "
                f"busy {summary['points'][-1]['busy']}")
            Path(a.out, "ratios-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            if m["failed"] or m["median_tpot_ms"] > a.stop_tpot:
                log(f"{lay.name} {shape}: median TPOT {m['median_tpot_ms']:.1f} ms > {a.stop_tpot} ms (or failures): sweep done")
                break


def conclude(model: str, folder: Path, a) -> None:
    """Costs from the workers' metrics, predicted against measured, the model's choice, the tables."""
    pts = [pd_point(f) for f in sorted(folder.glob("pd-*-c*.json"))]
    if not pts:
        return
    lines = [f"# {model}: {a.gpus} GPUs, commit {a.commit or '?'}, {a.machine}, {time.strftime('%Y-%m-%d')}", ""]
    try:
        c, used = costs_from_workers(pts)
    except ValueError as exc:
        lines.append(f"No costs fitted: {exc}")
        (folder / "model-vs-measured.md").write_text("\n".join(lines) + "\n")
        return
    (folder / "costs.json").write_text(json.dumps({"costs": c.__dict__, "used": used}, indent=1) + "\n")
    rows = compare(pts, c)
    lines += ["Costs from the workers' metrics of these runs: " + costs_text(c, used) + ".", "", table(rows), "", error_summary(rows), "",
              "Busy share per worker (engine step time / the point's duration; predicted per GPU kind):", "",
              "| layout | in:out | conc | measured | predicted |", "|---|---|---|---|---|"]
    for r in rows:
        p = r["point"]
        doc = json.loads((folder / p["file"]).read_text())
        lines.append(f"| {p['layout'].name} | {p['input_len']}:{p['output_len']} | {p['concurrency']} | "
                     + ", ".join(f"{w} {b:.2f}" for w, b in sorted(doc.get("busy", {}).items())) + " | "
                     + ", ".join(f"{k} {v:.2f}" for k, v in r["busy"].items()) + " |")
    concs = sorted(a.concurrency) + [2 * max(a.concurrency)]
    lines += ["", f"The model's choice on {a.gpus} GPUs (best goodput over concurrency {concs}, {a.waves:g} wave(s) per point):", ""]
    for shape in a.shapes:
        inp, out = (int(x) for x in shape.split(":"))
        for slo in SLOS:
            ranked = choose(a.gpus, inp, out, c, slo, concs, a.chunk, max(1, round(a.waves)))
            lines.append(f"- {shape}, {slo.name}: " + ", ".join(f"{n} {g:.2f} req/s (c={k})" for n, g, k in ranked))
    (folder / "model-vs-measured.md").write_text("\n".join(lines) + "\n")
    for shape in a.shapes:
        key = shape.replace(":", "_")
        if list(folder.glob(f"pd-{key}-*-c*.json")):
            (folder / f"table-{key}.md").write_text(report(folder, key) + "\n")
    log(f"{model}: wrote {folder / 'model-vs-measured.md'}\n" + error_summary(rows))


def run_model(model: str, a, budget: Budget, summary: dict, mesh_s: list[float]) -> None:
    from pdmesh.models.arch import arch_from_hf_config
    from pdmesh.models.presets import PRESETS
    from pdmesh.tokenizer import Tokenizer

    folder = Path(a.out) / model
    work = folder / "work"
    vocab = arch_from_hf_config(PRESETS[model]).vocab_size
    tok_dir = write_tokenizer(vocab, work / "tok")
    inp0 = int(a.shapes[0].split(":")[0])
    prompts = [prompt(inp0, s, vocab) for s in (11, 12)]
    ref_file = Path(a.reference_dir) / f"ref-{model}-{inp0}.json" if a.reference_dir else None
    if not (ref_file is not None and ref_file.exists()) and not budget.fits(f"{model} reference tokens", max(mesh_s)):
        return
    ref = reference_tokens(model, prompts, Tokenizer(str(tok_dir)), ref_file, a.cpu_smoke)
    prior = prior_costs(model)
    base = mesh_args(model, tok_dir, a.cpu_smoke)
    checked = summary["tokens_checked"].setdefault(model, {})
    for name in a.layouts:
        lay = Layout.parse(name, a.chunk)
        if not budget.fits(f"{model} {name} mesh", max(mesh_s) + 30):
            continue
        t0 = time.monotonic()
        up = checked_mesh(name, base + up_flags(lay), work / f"{name}.log", prompts, ref, checked, a.cpu_smoke, not lay.colocated)
        mesh_s.append(time.monotonic() - t0)
        summary["mesh_start_s"][f"{model} {name}"] = round(mesh_s[-1], 1)
        try:
            sweep(up, lay, model, tok_dir, folder, a, budget, prior, summary)
        finally:
            up.stop()
    conclude(model, folder, a)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, required=True, help="seconds for the whole run: what does not fit is skipped")
    ap.add_argument("--models", nargs="+", default=["llama-3.1-8b"])
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--layouts", nargs="+", default=None, help="default: every xPyD on --gpus GPUs, then --gpus colocated (NC)")
    ap.add_argument("--shapes", nargs="+", default=["3500:1500", "2500:1500"], help="INPUT:OUTPUT tokens")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--waves", type=float, default=1.0, help="requests per point = waves x concurrency")
    ap.add_argument("--chunk", type=int, default=2048, help="colocated chunked-prefill size (--max-num-batched-tokens)")
    ap.add_argument("--stop-tpot", type=float, default=35.0, help="a layout's sweep of a shape ends after a median TPOT above this")
    ap.add_argument("--reference-dir", default=None, help="keep/read reference tokens here (ref-MODEL-INPUT.json)")
    ap.add_argument("--commit", default=os.environ.get("PDMESH_COMMIT", ""))
    ap.add_argument("--machine", default=None, help="default: the GPUs nvidia-smi names (or 'CPU')")
    ap.add_argument("--cpu-smoke", action="store_true", help="check the orchestration on a CPU host: tiny model and shapes")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        a.models, a.gpus, a.shapes, a.concurrency, a.machine = ["smollm2-135m"], 2, ["48:6", "32:6"], [2, 4], "CPU (smoke)"
        a.stop_tpot = 200.0  # CPU steps: a sweep that goes on (1P1D) and one that stops (2C)
        a.layouts = a.layouts or ["1P1D", "2C"]
    a.layouts = a.layouts or [f"{x}P{a.gpus - x}D" for x in range(1, a.gpus)] + [f"{a.gpus}C"]
    if a.machine is None:
        import torch

        a.machine = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU"
    if a.budget <= 0 or a.waves < 1 or min(a.concurrency) < 1:
        raise SystemExit("--budget > 0, --waves >= 1 and every --concurrency >= 1, please")
    for name in a.layouts:
        if Layout.parse(name, a.chunk).gpus != a.gpus:
            raise SystemExit(f"--layouts {name} does not use --gpus {a.gpus} GPUs")
    budget = Budget(a.budget)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    summary: dict = {"args": vars(a), "points": [], "tokens_checked": {}, "mesh_start_s": {}, "skipped": budget.skipped}
    mesh_s = [150.0 if not a.cpu_smoke else 60.0]
    for model in a.models:
        run_model(model, a, budget, summary, mesh_s)
    summary["budget_left_s"] = round(budget.left(), 1)
    Path(a.out, "ratios-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"done; {len(summary['points'])} points, {len(budget.skipped)} skipped" + "".join(f"\n  skipped {s}" for s in budget.skipped))
    return 0 if summary["points"] else 1


if __name__ == "__main__":
    sys.exit(main())
