"""N-gram speculative decoding with the real embedded model (SmolLM2-135M-Instruct, CPU, fp32,
greedy): acceptance rate, tokens per verify step and engine steps, on copy-heavy chats (the answer
quotes the prompt) and open chats, tokens checked identical to decoding without speculation.
Usage: python benchmarks/spec_acceptance_cpu.py --out results/cpu/spec-acceptance.json"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pdmesh.bench.datasets import copy_heavy_chats, open_chats  # noqa: E402
from pdmesh.engine import LLM, SamplingParams  # noqa: E402


def one(llm: LLM, conv, max_tokens: int) -> dict:
    eng = llm.engine
    steps0 = eng.num_steps
    t0 = time.perf_counter()
    out = llm.chat([conv], SamplingParams(temperature=0, max_tokens=max_tokens))[0].outputs[0]
    return {"tokens": out.token_ids, "steps": eng.num_steps - steps0, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/cpu/spec-acceptance.json")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--lookup-max", type=int, default=3)
    ap.add_argument("--lookup-min", type=int, default=2)
    args = ap.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
            "prompt_lookup_min": args.lookup_min}
    plain = LLM(device="cpu", num_kv_blocks=256, block_size=16)
    fast = LLM(device="cpu", num_kv_blocks=256, block_size=16, speculative_config=spec)
    report = {"model": "SmolLM2-135M-Instruct (embedded GGUF, fp32)", "device": "cpu", "host": platform.node(),
              "speculative_config": spec, "max_tokens": args.max_tokens,
              "note": "steps and acceptance are the figures; seconds are wall time on whatever CPU ran it (a shared, "
                      "loaded 2-core machine for the committed file), not a speed measurement",
              "sets": {}}
    for name, chats in (("copy_heavy", copy_heavy_chats()), ("open", open_chats())):
        before = fast.engine.spec.stats.copy()
        rows, steps_plain, steps_spec, toks, identical = [], 0, 0, 0, True
        for conv in chats:
            a, b = one(plain, conv, args.max_tokens), one(fast, conv, args.max_tokens)
            identical &= a["tokens"] == b["tokens"]
            steps_plain += a["steps"]
            steps_spec += b["steps"]
            toks += len(a["tokens"])
            rows.append({"prompt": conv[0]["content"][:60], "tokens": len(a["tokens"]), "steps_plain": a["steps"],
                         "steps_spec": b["steps"], "identical": a["tokens"] == b["tokens"],
                         "seconds_plain": round(a["seconds"], 3), "seconds_spec": round(b["seconds"], 3)})
        s = fast.engine.spec.stats
        drafts, draft_toks = s.num_drafts - before.num_drafts, s.num_draft_tokens - before.num_draft_tokens
        acc = s.num_accepted_tokens - before.num_accepted_tokens
        report["sets"][name] = {
            "requests": rows, "tokens_identical": identical, "tokens": toks,
            "steps_plain": steps_plain, "steps_spec": steps_spec,
            "num_drafts": drafts, "num_draft_tokens": draft_toks, "num_accepted_tokens": acc,
            "acceptance_rate": round(acc / draft_toks, 4) if draft_toks else 0.0,
            "mean_acceptance_length": round(1 + acc / drafts, 3) if drafts else 0.0,
            "accepted_per_pos": [a - b for a, b in zip(s.accepted_per_pos, before.accepted_per_pos)],
            "steps_ratio": round(steps_plain / steps_spec, 3),
        }
        r = report["sets"][name]
        print(f"{name}: acceptance {r['acceptance_rate']:.2f}, {r['mean_acceptance_length']:.2f} tokens per verify, "
              f"steps {steps_plain} -> {steps_spec} ({r['steps_ratio']:.2f}x), identical={identical}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
