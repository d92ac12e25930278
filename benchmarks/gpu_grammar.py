"""The cost of structured-output masks on a decode step, against unconstrained decoding in the
same run (same engine, batch, context).  Goal: at most 10% on the decode step at batch 64.

    python benchmarks/gpu_grammar.py --preset llama-3.1-8b --batch 64 --out grammar.json     # GPU
    python benchmarks/gpu_grammar.py --preset smollm2-135m --device cpu --batch 4 --ctx 64 --steps 3 --async-scheduling on   # CPU check

Weights are ``--load-format dummy`` (random, the preset's exact shapes).  The grammar needs a
tokenizer: ``--tokenizer DIR`` (a real one), else a synthetic byte-level vocabulary of the preset's
size and an LLM-like shape (``pdmesh.testing.write_byte_level``), whose mask costs are of the same
order (compare both on CPU with ``--tokenizer`` pointing at the embedded model's directory).

Every sequence of the constrained phase follows a JSON schema that cannot end within the run (an
array of at least 400 records of strings, a bounded integer, an enum and a string array), so the
batch stays full and the matcher walks string, number, enum and structural states.  Phases:

* ``unconstrained``: the engine's default scheduling (async on CUDA: step N+1's host work overlaps N);
* ``unconstrained_sync``: one step at a time;
* ``constrained``: every sequence masked, the engine's default scheduling (async on CUDA: step N+1's
  forward is launched before step N is collected; when N's tokens arrive the matchers accept them
  and N+1's mask is filled on the host while the GPU runs that forward, then copied, applied and
  sampled);
* ``constrained_sync``: every sequence masked, one step at a time (for reference: the fill still
  overlaps the step's own forward, but nothing overlaps the host's other work).

The goal compares ``constrained`` with ``unconstrained``.  Also reported: the mask alone (fill + copy
+ apply for the batch), the steps each phase launched behind, and the schema's compile time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args, get_type_hints

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from pdmesh.engine.engine import LLMEngine  # noqa: E402
from pdmesh.engine.grammar import GrammarSpec  # noqa: E402
from pdmesh.engine.sequence import SamplingParams  # noqa: E402
from pdmesh.models.presets import PRESETS  # noqa: E402
from pdmesh.testing import write_byte_level  # noqa: E402

RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome", "Madrid", "Lisbon"]},
                         "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 12}}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["people"],
          "properties": {"people": {"type": "array", "minItems": 400, "items": RECORD}}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokenizer_dir(args, tmp: Path) -> str:
    if args.tokenizer:
        return args.tokenizer
    cfg = PRESETS[args.preset]
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
    return str(write_byte_level(cfg["vocab_size"], tmp / "tokenizer", eos_ids))


def build(args, tok: str) -> LLMEngine:
    ctx = args.ctx + args.warmup + args.steps * args.repeats + 64
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=args.preset, load_format="dummy", tokenizer=tok, max_model_len=ctx,
                          dtype="auto" if args.device == "cpu" else "bfloat16"),
        cache=CacheConfig(block_size=32, gpu_memory_utilization=0.9),
        scheduler=SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=max(2048, args.ctx),
                                  async_scheduling=args.async_scheduling),
        device=DeviceConfig(device=args.device, cpu_threads=args.cpu_threads)))


def phase(eng: LLMEngine, args, name: str, params: SamplingParams, async_on: bool) -> dict:
    """Fill the batch, decode ``warmup`` steps, then time ``repeats`` runs of ``steps`` steps."""
    eng.async_scheduling = async_on
    for i in range(args.batch):
        eng.add_request(f"{name}-{i}", [(i * 131 + j * 7) % 20000 + 10 for j in range(args.ctx)], params)
    while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running):
        eng.step()
    for _ in range(args.warmup):
        eng.step()
    runs = []
    behind = eng.num_steps_launched_behind
    for _ in range(args.repeats):
        sync(eng.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        sync(eng.device)
        runs.append((time.perf_counter() - t0) / args.steps)
    behind = eng.num_steps_launched_behind - behind
    running = len(eng.scheduler.running)
    for s in list(eng.scheduler.running):
        eng.abort(s.request_id)
    while eng.has_work():
        eng.step()
    assert running == args.batch, f"{name}: only {running} of {args.batch} sequences were still decoding"
    timed = args.steps * args.repeats
    if async_on and behind != timed:
        raise SystemExit(f"{name}: only {behind} of {timed} timed steps were launched behind the previous one")
    return {"phase": name, "step_ms": statistics.median(runs) * 1e3, "runs_ms": [r * 1e3 for r in runs],
            "async_scheduling": async_on, "steps_launched_behind": behind, "steps_timed": timed}


def mask_alone(eng: LLMEngine, spec: GrammarSpec, batch: int, iters: int = 20) -> float:
    """Median seconds of the batch's mask (host fill, copy, apply) on random logits, states advanced a
    few tokens into the schema."""
    g = eng.grammars
    states = [g.new_state(spec) for _ in range(batch)]
    logits = torch.randn(batch, eng.arch.vocab_size, device=eng.device)
    for s in states:  # walk each a few greedy steps so the rows are in different states
        for _ in range(3 + len(states) % 5):
            work = logits[:1].clone()
            g.apply(work, [s])
            s.accept(int(work.argmax()))
    times = []
    for _ in range(iters):
        work = logits.clone()
        sync(eng.device)
        t0 = time.perf_counter()
        g.apply(work, states)
        sync(eng.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    p.add_argument("--tokenizer", default=None, help="a real tokenizer directory (default: a synthetic one)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=30, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per phase (the median is reported)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--cpu-threads", type=int, default=0)
    p.add_argument("--async-scheduling", default="auto", choices=get_args(get_type_hints(SchedulerConfig)["async_scheduling"]),
                   help="the engine's default scheduling, used by the unconstrained and constrained phases "
                        "(auto: async on CUDA; 'on' exercises the async path on CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer_dir(args, Path(tmp))
        eng = build(args, tok)
        spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
        t0 = time.perf_counter()
        eng.compile_grammar(spec)
        compile_s = time.perf_counter() - t0
        room = eng.max_model_len - args.ctx
        free = SamplingParams(temperature=0, max_tokens=room, ignore_eos=True)
        constrained = SamplingParams(temperature=0, max_tokens=room, grammar=spec)
        default_async = eng.async_scheduling
        results = [phase(eng, args, "unconstrained", free, default_async),
                   phase(eng, args, "unconstrained_sync", free, False),
                   phase(eng, args, "constrained", constrained, default_async),
                   phase(eng, args, "constrained_sync", constrained, False)]
        mask_s = mask_alone(eng, spec, args.batch)
    base, sync_base, con, con_sync = (r["step_ms"] for r in results)
    report = {"preset": args.preset, "device": str(eng.device), "batch": args.batch, "context": args.ctx,
              "tokenizer": args.tokenizer or "synthetic byte-level", "vocab": eng.arch.vocab_size,
              "compile_ms": compile_s * 1e3,
              "mask_alone_ms": mask_s * 1e3, "phases": results,
              "overhead_vs_unconstrained": con / base - 1,
              "sync_overhead_vs_sync": con_sync / sync_base - 1,
              "goal": "constrained step <= 1.10 x unconstrained step (both the engine's default scheduling)",
              "goal_met": con <= 1.10 * base}
    print(f"{args.preset} batch {args.batch} ctx {args.ctx} on {eng.device} ({report['tokenizer']}, vocab {eng.arch.vocab_size})")
    print(f"  schema compile {compile_s * 1e3:.1f} ms; mask alone (fill + copy + apply, {args.batch} rows) {mask_s * 1e3:.3f} ms")
    for r in results:
        mode = "async" if r["async_scheduling"] else "one step at a time"
        print(f"  {r['phase']:<20} {r['step_ms']:8.3f} ms/step  ({mode}; {r['steps_launched_behind']}/{r['steps_timed']} launched behind)")
    print(f"  constrained / unconstrained = {con / base:.3f} (goal <= 1.10: {'met' if con <= 1.10 * base else 'NOT met'}); "
          f"one step at a time: {con_sync / sync_base:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
