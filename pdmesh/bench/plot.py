"""``pdmesh bench plot FILES --out PNG``: TTFT and TPOT (median and P99) against load (request
rate or concurrency), one line per result file/label.  Needs matplotlib (``pip install .[bench]``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


def _x(point: dict) -> tuple[str, float]:
    if point["max_concurrency"] is not None:
        return "max concurrency", float(point["max_concurrency"])
    rate = point["request_rate"]
    return "request rate (req/s)", float("inf") if rate == "inf" else float(rate)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="pdmesh bench plot")
    p.add_argument("files", nargs="+", help="result files written by pdmesh bench --result-file")
    p.add_argument("--out", required=True, help="PNG to write")
    a = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("pdmesh bench plot needs matplotlib: pip install 'pdmesh[bench]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xlabel = ""
    for f in a.files:
        doc = json.loads(Path(f).read_text())
        pts = [pt for pt in doc["points"] if _x(pt)[1] != float("inf")] or doc["points"]
        label = (pts[0].get("label") if pts else "") or Path(f).stem
        xs = [_x(pt)[1] for pt in pts]
        xlabel = _x(pts[0])[0] if pts else xlabel
        for ax, metric in zip(axes, ("ttft", "tpot")):
            ax.plot(xs, [pt["metrics"][f"median_{metric}_ms"] for pt in pts], marker="o", label=f"{label} median")
            if f"p99_{metric}_ms" in pts[0]["metrics"]:
                ax.plot(xs, [pt["metrics"][f"p99_{metric}_ms"] for pt in pts], marker="x", linestyle="--", label=f"{label} P99")
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return 0
