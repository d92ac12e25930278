"""Kernel variants for one decode step's layers, each timed as the engine runs it: a CUDA graph of
one call per layer (distinct weights / KV per layer, so nothing is served from L2), replayed and
timed with CUDA events; microseconds per layer and achieved bandwidth.  It picks between options
the engine offers (FlashInfer tensor-core or CUDA-core decode, split-KV or not; GEMM forms for
one-row inputs; our Triton split-KV decode attention, configs swept).
Usage: python benchmarks/gpu_kernels.py [--out kernels.json] [--only attention gemm gemv]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

SHAPES = {  # name: (hq, hkv, head_dim, layers, hidden, intermediate)
    "qwen2.5-0.5b": (14, 2, 64, 24, 896, 4864),
    "llama-3.1-8b": (32, 8, 128, 32, 4096, 14336),
}


def graph_time_us(fn, calls: int) -> float:
    """Median microseconds per call of ``fn(i)`` for i in range(calls), captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(ts)


def _paged_setup(model: str, batch: int, ctx: int):
    """Per-layer KV pools (pages shuffled), the CSR page table and a query, as a decode step sees them."""
    hq, hkv, d, layers, _, _ = SHAPES[model]
    bs = 32
    pages = -(-ctx // bs)
    n = batch * pages + 1
    kv = [torch.randn(n, 2, bs, hkv, d, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
    indices = (torch.randperm(n - 1, dtype=torch.int32) + 1)[: batch * pages]
    indptr = torch.arange(0, batch * pages + 1, pages, dtype=torch.int32)
    last = torch.full((batch,), ctx - (pages - 1) * bs, dtype=torch.int32)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    return kv, indptr, indices, last, q, bs


def _flashinfer_decode(model: str, batch: int, setup, tensor_cores: bool, split: bool):
    import flashinfer

    hq, hkv, d = SHAPES[model][:3]
    kv, indptr, indices, last, q, bs = setup
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device="cuda"),
        paged_kv_indices_buffer=torch.zeros(indices.shape[0], dtype=torch.int32, device="cuda"),
        paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device="cuda"))
    w.plan(indptr, indices, last, hq, hkv, d, bs, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
           disable_split_kv=not split)
    out = torch.empty_like(q)
    return lambda i: w.run(q, kv[i], out=out)


def attention(model: str, batch: int, ctx: int, kernel: str, tensor_cores: bool = True, split: bool = True,
              config=None, splits=None) -> dict:
    """kernel 'flashinfer' (tensor cores or not, split-KV or not) or 'triton' (config: block_n, stages;
    None: the engine's own pick)."""
    from pdmesh.attention.paged import PagedMetadata
    from pdmesh.attention.triton_decode import DecodeAttention

    hq, hkv, d, layers = SHAPES[model][:4]
    setup = _paged_setup(model, batch, ctx)
    kv, indptr, indices, last, q, bs = setup
    reference = _flashinfer_decode(model, batch, setup, True, True)
    ref = reference(0).float().clone()
    if kernel == "flashinfer":
        fn = _flashinfer_decode(model, batch, setup, tensor_cores, split)
    else:
        da = DecodeAttention(torch.device("cuda"), hq, hkv, d, bs, graph_batch=batch, max_pages=indices.shape[0] // batch,
                             tiles=config, splits=splits)
        da.plan(PagedMetadata(None, indptr.numpy(), indices.numpy(), last.numpy()))
        fn = lambda i: da.run(q, kv[i])  # noqa: E731
    err = ((fn(0).float() - ref).norm() / ref.norm()).item()
    us = graph_time_us(fn, layers)
    nbytes = batch * ctx * 2 * hkv * d * 2
    kv = setup = None  # free the memory (closures above still name them)
    torch.cuda.empty_cache()
    return {"what": "attention", "model": model, "batch": batch, "ctx": ctx, "kernel": kernel,
            "tensor_cores": tensor_cores if kernel == "flashinfer" else None,
            "split_kv": split if kernel == "flashinfer" else None,
            "config": list(config) if config else (None if kernel == "flashinfer" else ["auto", da.block_n, da.num_stages]),
            "splits": None if kernel == "flashinfer" else da.splits,
            "us_per_layer": us, "tb_per_s": nbytes / us / 1e6, "rel_err_vs_flashinfer_tc": err}


def gemm(model: str, name: str, n_out: int, k: int, m: int, form: str) -> dict:
    layers = SHAPES[model][3]
    ws = [torch.randn(n_out, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(layers)]
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    if form == "linear":
        fn = lambda i: F.linear(x, ws[i])  # noqa: E731
    elif form == "mv":
        xv = x[0]
        fn = lambda i: torch.mv(ws[i], xv)  # noqa: E731
    else:  # "wx": weight on the left, [N, K] @ [K, M]
        xt = x.t()
        fn = lambda i: torch.matmul(ws[i], xt)  # noqa: E731
    ref = F.linear(x, ws[0]).float()
    got = fn(0).float().reshape(ref.shape[1], -1).t() if form != "linear" else fn(0).float()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    us = graph_time_us(fn, layers)
    nbytes = n_out * k * 2
    ws = None  # free the memory (closures above still name them)
    torch.cuda.empty_cache()
    return {"what": "gemm", "model": model, "name": name, "n": n_out, "k": k, "m": m, "form": form,
            "us_per_layer": us, "tb_per_s": nbytes / us / 1e6, "max_rel_err": err}


def triton_gemv(model: str, name: str, n_out: int, k: int, silu_mul: bool, bias: bool, config) -> dict:
    from pdmesh.models.gemv import gemv

    layers = SHAPES[model][3]
    ws = [torch.randn(n_out, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(layers)]
    b = torch.randn(n_out, dtype=torch.bfloat16, device="cuda") if bias else None
    x = torch.randn(1, 2 * k if silu_mul else k, dtype=torch.bfloat16, device="cuda")
    xin = (F.silu(x[:, :k].float()) * x[:, k:].float()).to(x.dtype) if silu_mul else x
    ref = F.linear(xin, ws[0], b).float()
    err = ((gemv(x, ws[0], b, silu_mul, config).float() - ref).abs().max() / ref.abs().max()).item()
    us = graph_time_us(lambda i: gemv(x, ws[i], b, silu_mul, config), layers)
    ws = None  # free the memory (closures above still name them)
    torch.cuda.empty_cache()
    return {"what": "triton_gemv", "model": model, "name": name, "n": n_out, "k": k, "silu_mul": silu_mul, "bias": bias,
            "config": list(config) if config else "default", "us_per_layer": us, "tb_per_s": n_out * k * 2 / us / 1e6,
            "max_rel_err": err}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--only", nargs="*", default=["attention", "gemm", "gemv"])
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton decode's tile configs")
    ap.add_argument("--sweep-splits", action="store_true", help="also sweep the Triton decode's KV splits")
    a = ap.parse_args()
    rows = []

    def add(r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    for model in SHAPES if "attention" in a.only else ():
        for b in (1, 64):
            for tc, split in ((True, True), (False, True)):
                if not tc and SHAPES[model][0] // SHAPES[model][1] not in (1, 2, 3, 4, 8):
                    continue
                add(attention(model, b, 2131, "flashinfer", tc, split))
            add(attention(model, b, 2131, "triton"))  # the engine's pick
            sweep = [((bn, st), None) for bn in (32, 64, 128) for st in (1, 2, 3)] if a.sweep else []
            sweep += [(None, n) for n in ((1, 2, 3, 4, 6, 8) if b > 8 else (8, 16, 32, 64))] if a.sweep_splits else []
            for config, splits in sweep:
                try:
                    r = attention(model, b, 2131, "triton", config=config, splits=splits)
                except Exception as exc:  # noqa: BLE001 - a config that does not fit is a result too
                    print(f"  {model} b={b} triton {config} splits {splits}: {repr(exc)[:120]}", flush=True)
                    continue
                print(f"  {model} b={b} triton {r['config']} splits {r['splits']} {r['us_per_layer']:.2f} us "
                      f"err {r['rel_err_vs_flashinfer_tc']:.2e}", flush=True)
    for model, (hq, hkv, d, _, hid, inter) in SHAPES.items():
        shapes = {"qkv": ((hq + 2 * hkv) * d, hid), "o": (hid, hq * d), "gate_up": (2 * inter, hid), "down": (hid, inter)}
        for name, (n_out, k) in shapes.items() if "gemm" in a.only else ():
            for m in (1, 64):
                for form in (("linear", "mv", "wx") if m == 1 else ("linear", "wx")):
                    add(gemm(model, name, n_out, k, m, form))
    for model, (hq, hkv, d, _, hid, inter) in SHAPES.items() if "gemv" in a.only else ():
        shapes = {"qkv": ((hq + 2 * hkv) * d, hid, False), "o": (hid, hq * d, False), "gate_up": (2 * inter, hid, False),
                  "down": (hid, inter, True)}
        for name, (n_out, k, silu_mul) in shapes.items():
            add(gemm(model, name, n_out, k, 1, "linear"))
            best = None
            for config in [None] + [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)]:
                r = triton_gemv(model, name, n_out, k, silu_mul, model.startswith("qwen") and name == "qkv", config)
                print(f"  {model} {name} {config} {r['us_per_layer']:.2f} us", flush=True)
                if config is None:
                    add(r)
                elif best is None or r["us_per_layer"] < best["us_per_layer"]:
                    best = r
            add(best)
    with open(a.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
