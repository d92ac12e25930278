"""Tensor parallelism on two GPUs (skipped with fewer): NCCL between rank processes, decode CUDA
graphs captured per rank with the all-reduce inside (NCCL, symmetric memory, FlashInfer's all-reduce
fused with the residual add and RMSNorm), and KV handed between TP sizes over cuda_ipc through a real
mesh.  ``benchmarks/gpu_tp.sh`` runs this file first and measures nothing unless the token tests pass.

Exactness: float32 with the torch attention backend gives TP 1's tokens at TP 2 (as on CPU); in
bf16 a different TP size sums in another order, so bf16 checks compare like with like (graphs
against eager at the same TP size) or logits within a tolerance.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                                  reason="needs 2 GPUs")]

MODEL = "qwen2.5-0.5b"  # 14 heads / 2 KV heads: 7 and 1 per rank at TP 2
PROMPTS = [[(i * 7919 + 13 * j) % 150000 + 1 for i in range(n)] for j, n in enumerate((37, 301, 700))]
OUT = 24


def _run(tp: int, device: str, **kw) -> list[list[int]]:
    from pdmesh.engine import LLM, SamplingParams

    with LLM(model=MODEL, load_format="dummy", device=device, tensor_parallel_size=tp, num_kv_blocks=256,
             max_model_len=2048, max_num_seqs=16, **kw) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=OUT, ignore_eos=True), detokenize=False)
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


def test_tp2_tokens_equal_tp1_in_float32():
    ref = _run(1, "cuda:0", dtype="float32", attention_backend="torch")
    assert _run(2, "cuda:0,1", dtype="float32", attention_backend="torch") == ref
    assert _run(2, "cuda:1,0", dtype="float32", attention_backend="torch") == ref  # rank 0 on GPU 1


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from benchmarks.synthetic_tokenizer import write
    from pdmesh.models.arch import arch_from_hf_config
    from pdmesh.models.presets import PRESETS

    return write(arch_from_hf_config(PRESETS[MODEL]).vocab_size, tmp_path_factory.mktemp("tok"))


def test_mesh_hands_kv_between_tp_sizes_over_cuda_ipc(tmp_path, tokenizer_dir):
    """Prefill TP 2 and TP 1, decode TP 1 and TP 2 (round-robin over the four pairs), cuda_ipc,
    float32: every request's tokens equal one TP-1 engine's; pulled KV equal to the source's checksums."""
    from pdmesh.client import InferenceClient
    from tests.meshproc import Services, free_port, scrape, wait_idle

    ref = {tuple(p): t for p, t in zip(PROMPTS, _run(1, "cuda:0", dtype="float32", attention_backend="torch"))}
    model = ("--model", MODEL, "--load-format", "dummy", "--tokenizer", str(tokenizer_dir), "--dtype", "float32",
             "--max-model-len", "2048")
    worker = (*model, "--attention-backend", "torch", "--kv-transports", "cuda_ipc", "--kv-audit", "--num-kv-blocks", "256",
              "--gpu-memory-utilization", "0.2")
    grpc_port = free_port()
    placement = {"prefill-0": ("cuda:0,1", 2), "prefill-1": ("cuda:0", 1), "decode-0": ("cuda:1", 1), "decode-1": ("cuda:1,0", 2)}
    svc = Services(tmp_path, prefill=0, decode=0, worker_args=worker, scheduler_args=("--routing", "round-robin"),
                   gateway_args=(*model[:6], "--grpc-port", str(grpc_port)),
                   workers=tuple((n, ("--device", d, "--tensor-parallel-size", str(tp))) for n, (d, tp) in placement.items()))
    try:
        svc.wait_workers(2, 2)
        with InferenceClient(f"127.0.0.1:{grpc_port}", timeout=300) as client:
            for prompt in PROMPTS:
                for _ in range(4):
                    assert client.complete(prompt, max_tokens=OUT, temperature=0, ignore_eos=True).token_ids == ref[tuple(prompt)]
        wait_idle(svc.scheduler, timeout=30, expect=4)
        for name in placement:
            m = scrape(svc.metrics_url(name))
            assert m.get("pdmesh:kv_audit_mismatches_total", 0) == 0, name
            if name.startswith("decode"):
                assert m.get('pdmesh:kv_transfer_bytes_total{transport="cuda_ipc"}', 0) > 0, name
    finally:
        rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


def _graphs_run(all_reduce: str, eager: bool) -> tuple[list[list[int]], torch.Tensor, str]:
    """Greedy tokens (async scheduling), the logits after PROMPTS[1], and the all-reduce that ran,
    of a bf16 TP-2 engine on GPUs 0,1 (FlashInfer attention; decode graphs unless ``eager``)."""
    from pdmesh.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pdmesh.engine import LLM, SamplingParams

    cfg = EngineConfig(model=ModelConfig(model=MODEL, load_format="dummy", max_model_len=2048),
                       cache=CacheConfig(num_kv_blocks=256), scheduler=SchedulerConfig(max_num_seqs=16, async_scheduling="on"),
                       device=DeviceConfig(device="cuda:0,1", tensor_parallel_size=2, enforce_eager=eager,
                                           tp_all_reduce=all_reduce))
    with LLM(engine_config=cfg) as llm:
        assert (llm.engine.runner.graphs is None) == eager
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=OUT, ignore_eos=True), detokenize=False)
        assert llm.engine.num_steps_launched_behind > 0
        logits = llm.engine.score(PROMPTS[1]).float().cpu()
        impl = llm.engine.tp.all_reduce_impl
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs], logits, impl


@pytest.fixture(scope="module")
def eager_nccl():
    return _graphs_run("nccl", eager=True)


@pytest.mark.parametrize("all_reduce", ["nccl", "symm_mem"])
def test_tp2_decode_graphs(all_reduce, eager_nccl):
    """Decode graphs with the all-reduce captured inside give eager NCCL's tokens exactly: with two
    ranks every all-reduce is one correctly rounded a + b, whichever kernel adds."""
    tokens, logits, impl = _graphs_run(all_reduce, eager=False)
    assert impl == all_reduce, f"asked for {all_reduce}, {impl} ran (it could not start: see the log)"
    assert tokens == eager_nccl[0]
    assert ((logits - eager_nccl[1]).norm() / eager_nccl[1].norm()).item() < 1e-3


def test_tp2_flashinfer_fused_all_reduce_norm(eager_nccl):
    """--tp-all-reduce flashinfer (all-reduce + residual add + RMSNorm in one kernel, in the decode
    graphs): its own arithmetic, so logits within bf16 tolerance of NCCL's and the first tokens equal."""
    tokens, logits, impl = _graphs_run("flashinfer", eager=False)
    assert impl == "flashinfer", f"{impl} ran: the fused all-reduce could not start (see the log)"
    ref_tokens, ref_logits, _ = eager_nccl
    assert ((logits - ref_logits).norm() / ref_logits.norm()).item() < 2e-2
    assert [t[0] for t in tokens] == [t[0] for t in ref_tokens]
