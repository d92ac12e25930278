"""KV transfer between two GPUs, one command (issue: KV connector + NIXL):

* ``pulls``: a 3,500-token llama-3.1-8b (dummy shapes, bf16, 32-token blocks, scattered source
  pages) pull from a pool on cuda:0 owned by another process into a pool on cuda:1 — by
  ``cuda_ipc`` (our transport's launch + CUDA event), by NIXL with UCX's default transports
  (NVLink/cuda_ipc), and by NIXL forced onto TCP (``UCX_TLS``, a stand-in for a link between hosts) —
  against one contiguous peer copy of the same bytes; data checked, medians of 20 after warm-up.
  Every NIXL setting is measured twice in one process: unstaged (one READ region per (layer,
  block)) and staged (``--nixl-staging-mb``'s default arenas on both sides: the source packs the
  blocks on request — a pipe round trip standing in for ``BeginRead`` — the reader does one READ and
  one scatter, or READs straight into consecutive blocks); ``pack_ms`` and ``read_ms`` split it.
* ``mesh``: scheduler, gateway, prefill on cuda:0 and decode on cuda:1 with ``--kv-transports
  nixl``; greedy token ids through the gRPC API compared with one engine in one process.

Usage (GPU machine, 2 GPUs; nixl-cu13 importable, e.g. from .gpu-site on PYTHONPATH):
    python3 benchmarks/gpu_kv_transfer.py [pulls] [mesh] --out kv_transfer.json [--tok .gpu_tok]
Prints one JSON line per measurement and writes them all to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS, BLOCK, PRESET = 3500, 32, "llama-3.1-8b"
CPU_CHECK = "cpu" in sys.argv
"""``--devices cpu cpu``: a check of the code path, not a measurement."""


def _pool(device: str, blocks: int):
    import torch

    from pdmesh.config import ModelConfig
    from pdmesh.kv.pool import KVCachePool
    from pdmesh.models.loader import resolve

    arch = resolve(ModelConfig(model=PRESET, load_format="dummy")).arch
    return KVCachePool(arch, blocks, BLOCK, torch.bfloat16, torch.device(device))


def _ids(n: int, contiguous: bool = False) -> tuple[list[int], list[int]]:
    if contiguous:  # as in a fresh pool: NIXL merges adjacent descriptors into one region per layer
        return list(range(n)), list(range(2 * n, 3 * n))
    return list(range(0, 2 * n, 2)), list(range(3 * n, 2 * n, -1))[:n]  # scattered pages, as after real traffic


def _staging_bytes() -> int:
    from pdmesh.worker import WorkerConfig

    return WorkerConfig.nixl_staging_mb << 20


def _owner(device: str, blocks: int, conn, contiguous: bool = False) -> None:
    """Child: a source pool with random KV, offered by CUDA IPC handle and NIXL metadata; then, as
    ``BeginRead`` with ``stage`` does, packs the block ids it receives into an extent of its staging
    arena and answers (region, pack ms), freeing the extent at the next message, until 'bye'."""
    from pdmesh.transport.cuda_ipc import export_handle
    from pdmesh.transport.nixl import NixlAgent

    pool = _pool(device, blocks)
    pool.kv.normal_()
    agent = NixlAgent("bench-src", pool, "src", staging_bytes=_staging_bytes())
    handle = export_handle(pool, "src").SerializeToString() if pool.kv.is_cuda else b""
    conn.send((handle, agent.metadata().SerializeToString(), None if pool.kv.is_cuda else pool.kv[:, _ids(blocks // 4, contiguous)[0]]))
    while (ids := conn.recv()) != "bye":
        t0 = time.perf_counter()
        ext = agent.arena.alloc(agent.staged_bytes(len(ids)))
        assert ext is not None, "the staging arena is too small for the pull"
        agent.pack(ext, ids)
        ms = (time.perf_counter() - t0) * 1e3
        conn.send((agent.staged_region(ext, len(ids)).SerializeToString(), ms))
        conn.recv()  # the read has ended
        agent.arena.free(ext)


def _median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    if CPU_CHECK:  # the CPU check of the code path: a few rounds of 461 MB on a small host are enough
        iters, warmup = 3, 1
    ts = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def pulls(src_dev: str, dst_dev: str, which: list[str], nixl_threads: int = 0, contiguous: bool = False) -> list[dict]:
    import torch

    from pdmesh.kv.shards import plan_pieces
    from pdmesh.transport.base import TransferState
    from pdmesh.transport.cuda_ipc import CudaIpcTransport, open_handle
    from pdmesh.transport.nixl import NixlAgent, NixlKVTransport, NixlSource
    from pdmesh.v1 import kv_transfer_pb2 as kpb

    n = -(-TOKENS // BLOCK)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_owner, args=(src_dev, 4 * n, child, contiguous))
    p.start()
    out = []
    try:
        h_bytes, md_bytes, cpu_want = parent.recv()
        dst = _pool(dst_dev, 4 * n)
        src_ids, dst_ids = _ids(n, contiguous)
        nbytes = n * dst.layout.block_bytes
        remote = open_handle(kpb.CudaIpcHandle.FromString(h_bytes)) if h_bytes else None
        want = remote[:, src_ids].cpu() if remote is not None else cpu_want
        a = torch.empty(nbytes, dtype=torch.uint8, device=src_dev)
        b = torch.empty(nbytes, dtype=torch.uint8, device=dst_dev)

        def copy_whole():  # (named so as not to shadow ``contiguous``, the block-id choice)
            b.copy_(a)
            if b.is_cuda:
                torch.cuda.synchronize(dst_dev)

        ref_ms = _median_ms(copy_whole)
        base = {"model": PRESET, "tokens": TOKENS, "bytes": nbytes, "src": src_dev, "dst": dst_dev,
                "contiguous_copy_ms": ref_ms, "contiguous_gbps": nbytes / ref_ms / 1e6,
                "ucx_tls": os.environ.get("UCX_TLS", ""),
                "blocks": "contiguous" if contiguous else "scattered"}
        whole = plan_pieces(dst.layout.num_kv_heads, 1, 1)  # TP 1 to TP 1: every head, rank 0 to rank 0
        if "cuda_ipc" in which:
            tr = CudaIpcTransport(None, torch.device(dst_dev))  # type: ignore[arg-type]
            dst.kv.zero_()

            def ipc_pull() -> None:
                for _, ev in tr.launch({0: remote}, [0], whole, src_ids, dst_ids, dst).timings:
                    ev.synchronize()

            ms = _median_ms(ipc_pull)
            out.append({**base, "transport": "cuda_ipc", "pull_ms": ms, "pull_gbps": nbytes / ms / 1e6,
                        "fraction_of_copy_bw": ref_ms / ms, "data_equal": torch.equal(dst.kv[:, dst_ids].cpu(), want)})
        if "nixl" in which:
            t0 = time.perf_counter()
            agent = NixlAgent("bench-dst", dst, "dst", num_threads=nixl_threads, staging_bytes=_staging_bytes())
            tr = NixlKVTransport(None, agent)  # type: ignore[arg-type]
            peer = tr._open_peer(kpb.NixlMetadata.FromString(md_bytes))
            setup_ms = (time.perf_counter() - t0) * 1e3

            def run(x) -> None:
                while (st := x.poll()) is TransferState.RUNNING:
                    pass
                assert st is TransferState.DONE, x.error

            dst.kv.zero_()
            ms = _median_ms(lambda: run(tr.read(peer, src_ids, dst_ids)))
            nixl = {**base, "transport": "nixl", "nixl_threads": nixl_threads, "agent_and_peer_setup_ms": setup_ms}
            out.append({**nixl, "staged": False, "pull_ms": ms, "pull_gbps": nbytes / ms / 1e6, "fraction_of_copy_bw": ref_ms / ms,
                        "descriptors_per_pull": n * dst.kv.shape[0], "data_equal": torch.equal(dst.kv[:, dst_ids].cpu(), want)})
            split: dict[str, list[float]] = {"pack_ms": [], "read_ms": []}

            def staged() -> None:
                parent.send(src_ids)
                region, pack_ms = parent.recv()
                t1 = time.perf_counter()
                run(tr.launch(NixlSource(peer, kpb.NixlStagedRegion.FromString(region)), [0], whole, src_ids, dst_ids, dst))
                split["read_ms"].append((time.perf_counter() - t1) * 1e3)
                split["pack_ms"].append(pack_ms)
                parent.send("done")

            dst.kv.zero_()
            before = dict(tr.reads_total)
            ms = _median_ms(staged)
            kinds = {k: v - before[k] for k, v in tr.reads_total.items() if v > before[k]}
            out.append({**nixl, "staged": True, "read_kinds": kinds, "pull_ms": ms, "pull_gbps": nbytes / ms / 1e6,
                        "fraction_of_copy_bw": ref_ms / ms, **{k: statistics.median(v) for k, v in split.items()},
                        "descriptors_per_pull": 1 if "staged" in kinds else dst.kv.shape[0],
                        "staging_mb": _staging_bytes() >> 20, "data_equal": torch.equal(dst.kv[:, dst_ids].cpu(), want)})
    finally:
        parent.send("bye")
        p.join(60)
    for r in out:
        print("PULL " + json.dumps(r), flush=True)
    return out


def mesh(tok: str) -> dict:
    """Prefill on cuda:0, decode on cuda:1, KV over NIXL; token ids against one engine."""
    import torch

    from pdmesh.client import InferenceClient
    from pdmesh.engine.engine import LLMEngine
    from pdmesh.engine.sequence import SamplingParams
    from pdmesh.testing import engine_config
    from tests.meshproc import Services, free_port, scrape

    model = "qwen2.5-0.5b"
    prompts = [[(i * 31 + j) % 5000 + 10 for j in range(1500)] for i in range(4)]
    common = ("--model", model, "--load-format", "dummy", "--tokenizer", tok, "--max-model-len", "4096",
              "--gpu-memory-utilization", "0.3", "--max-num-seqs", "32", "--kv-transports", "nixl")
    grpc_port = free_port()
    svc = Services(Path(tempfile.mkdtemp()), prefill=0, decode=0, worker_args=common,
                   workers=(("prefill-0", ("--device", "cuda:0")), ("decode-0", ("--device", "cuda:1"))),
                   gateway_args=("--grpc-port", str(grpc_port), *common[:8]))  # the gateway's model and tokenizer
    out: dict = {"model": model, "placement": "prefill cuda:0, decode cuda:1", "transport": "nixl"}
    got = []
    try:
        svc.wait_workers(1, 1)
        with InferenceClient(f"127.0.0.1:{grpc_port}") as client:
            for p in prompts:
                ids: list[int] = []
                for msg in client.generate(p, max_tokens=32, temperature=0, ignore_eos=True):
                    ids += list(msg.token_ids)
                got.append(ids)
        m = scrape(svc.metrics_url("decode-0"))
        out["nixl_bytes"] = m.get('pdmesh:kv_transfer_bytes_total{transport="nixl"}', 0)
        out["pull_failures"] = m.get("pdmesh:kv_transfer_failures_total", 0)
    finally:
        out["stop_rc"] = svc.stop_all()
    eng = LLMEngine(engine_config(model, device="cuda:0", max_model_len=4096, num_kv_blocks=1024))
    want = []
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        ids = []
        while eng.has_work():
            for o in eng.step():
                ids += o.new_token_ids
        want.append(ids)
    del eng
    torch.cuda.empty_cache()
    out["tokens_equal_one_engine"] = got == want
    out["requests"] = len(got)
    print("MESH " + json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stages", nargs="*", default=["pulls", "mesh"])
    ap.add_argument("--out", default="kv_transfer.json")
    ap.add_argument("--tok", default=".gpu_tok")
    ap.add_argument("--tcp-tls", default="tcp,cuda_copy", help="UCX_TLS of the NIXL-over-TCP measurement")
    ap.add_argument("--devices", nargs=2, default=["cuda:0", "cuda:1"], help="source and destination (cpu cpu: a CPU check of the nixl path)")
    ap.add_argument("--nixl-threads", type=int, nargs="+", default=[0, 8],
                    help="NIXL UCX backend worker threads to measure (each a child process with the default UCX_TLS)")
    ap.add_argument("--nixl-tls", nargs="*", default=["cuda_ipc,cuda_copy,tcp,self"],
                    help="further UCX_TLS settings to measure NIXL's GPU-to-GPU pull under (with the most threads)")
    ap.add_argument("--contiguous", action="store_true", help=argparse.SUPPRESS)  # child run: consecutive block ids
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)  # child run: 'nixl' pulls alone, as JSON
    a = ap.parse_args()
    if a.only:
        print(json.dumps(pulls(*a.devices, [a.only], a.nixl_threads[0], a.contiguous)))
        return
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    if "pulls" in a.stages:
        cpu = a.devices[0] == "cpu"
        res["pulls"] = pulls(*a.devices, ["cuda_ipc"]) if not cpu else []
        most = max(a.nixl_threads)
        variants = [(t, None, False) for t in a.nixl_threads] + [(most, tls, False) for tls in ([] if cpu else a.nixl_tls)]
        variants.append((most, "tcp" if cpu else a.tcp_tls, False))  # the stand-in for a link between hosts
        variants.append((most, None, True))  # consecutive blocks on both sides (merged descriptors)
        for threads, tls, contiguous in variants:  # each in a child: UCX reads UCX_TLS once per process
            env = dict(os.environ, UCX_PROTO_INFO="y")
            if tls is not None:
                env["UCX_TLS"] = tls
            r = subprocess.run([sys.executable, __file__, "--only", "nixl", "--devices", *a.devices, "--nixl-threads", str(threads)]
                               + (["--contiguous"] if contiguous else []),
                               env=env, capture_output=True, text=True, timeout=300)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
            # UCX_PROTO_INFO: the protocol table UCX chose for the remote reads (which link moved the bytes)
            text = (r.stdout + r.stderr).splitlines()
            proto = [ln.split("]", 1)[-1].strip() for i, ln in enumerate(text)
                     if any("remote memory read" in x for x in text[max(0, i - 4):i + 1])][:12]
            got = json.loads(lines[-1]) if lines else [{"transport": "nixl", "ucx_tls": tls or "", "nixl_threads": threads,
                                                       "error": r.stderr[-2000:]}]
            for g in got:
                g["ucx_protocols"] = proto
            res["pulls"] += got
            print(json.dumps(got)[:1500], flush=True)
    if "mesh" in a.stages:
        try:
            if not Path(a.tok).exists():  # a synthetic byte-level tokenizer of the model's vocabulary
                from benchmarks.synthetic_tokenizer import write as write_tokenizer
                from pdmesh.models.arch import arch_from_hf_config
                from pdmesh.models.presets import PRESETS
                write_tokenizer(arch_from_hf_config(PRESETS["qwen2.5-0.5b"]).vocab_size, Path(a.tok))
            res["mesh"] = mesh(a.tok)
        except Exception as exc:  # noqa: BLE001 - report, keep the pull figures
            res["mesh"] = {"error": repr(exc)}
            print("MESH " + json.dumps(res["mesh"]), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    for r in res.get("pulls", []):
        if "pull_ms" in r:
            kind = ("staged" if r.get("staged") else "unstaged") if r["transport"] == "nixl" else "-"
            print(f"{r['transport']:9s} {kind:8s} {r['blocks']:10s} threads={r.get('nixl_threads', '-')} UCX_TLS={r['ucx_tls'] or '-':14s} "
                  f"{r['pull_ms']:8.2f} ms {r['pull_gbps']:7.1f} GB/s "
                  f"= {r['fraction_of_copy_bw']:.2f} of the contiguous copy ({r['contiguous_gbps']:.0f} GB/s) data_equal={r['data_equal']}")


if __name__ == "__main__":
    main()
