"""A Qwen3-MoE model served by ``pdmesh up`` on CPU: a prefill worker of TP 2 with expert
parallelism (whole experts per rank), a decode worker of TP 2 splitting every expert's width, and
a colocated TP-1 worker; prompts of 32 tokens and more go disaggregated (KV handed from the EP
worker to the width-split one over grpc), shorter ones colocated.  Tokens through the gateway
equal one TP-1 engine's in this process, every worker served its share, every block is back."""

from __future__ import annotations

import pytest

from pdmesh.client import InferenceClient
from pdmesh.engine import LLM, SamplingParams
from tests.meshproc import Mesh, list_workers, wait_until

PROMPTS = [list(range(1000, 1070)), [5, 17, 42, 7, 99, 3] * 7, [11, 12, 13, 14, 15], list(range(300, 320))]
"""Two long prompts (disaggregated), two short ones (colocated)."""
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def moe_mesh(tmp_path_factory, tiny_qwen3_moe, embedded_dir):
    m = Mesh(tmp_path_factory.mktemp("moe-mesh"), prefill=1, decode=1, colocated=1,
             extra=["--model", tiny_qwen3_moe, "--tokenizer", str(embedded_dir), "--served-model-name", "tiny-moe",
                    "--max-model-len", "256", "--prefill-tensor-parallel-size", "2", "--decode-tensor-parallel-size", "2",
                    "--prefill-args=--enable-expert-parallel", "--scheduler-args", "--colocate-below-tokens 32"])
    yield m
    assert m.stop() == 0, m.proc.tail()
    assert m.service_pids() == []


@pytest.fixture(scope="module")
def reference(tiny_qwen3_moe) -> dict:
    llm = LLM(model=tiny_qwen3_moe, device="cpu", max_model_len=256)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), detokenize=False)
    return {tuple(p): o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)}


def _served(mesh) -> dict[int, int]:
    """Requests served so far by role (1 prefill, 2 decode, 3 colocated)."""
    return {w.info.role: w.load.requests_total for w in list_workers(mesh.scheduler)}


def test_moe_mesh_gives_one_engines_tokens(moe_mesh, reference):
    before = _served(moe_mesh)
    with InferenceClient(f"127.0.0.1:{moe_mesh.grpc_port}", timeout=120) as client:
        for prompt in PROMPTS:
            for _ in range(2):
                got = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True).token_ids
                assert got == reference[tuple(prompt)], f"a {len(prompt)}-token prompt changed its tokens"
    # 4 long requests went prefill -> decode, 4 short ones to the colocated worker (loads arrive with heartbeats)
    wait_until(lambda: {r: n - before[r] for r, n in _served(moe_mesh).items()} == {1: 4, 2: 4, 3: 4}, 10,
               "long prompts disaggregated, short ones colocated")
    ws = moe_mesh.wait_idle(timeout=20)
    assert len(ws) == 3
