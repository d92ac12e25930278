"""The whole mesh as a user starts it (``pdmesh up``: scheduler, workers and gateway as real
processes) on every placement of prefill and decode over GPUs 0 and 1, and a colocated worker on
GPU 1: the greedy tokens of distinct prompts, sent one at a time, equal those of one engine on
``cuda:0`` exactly (same kernels, same batch shapes: bf16 results are bitwise reproducible).

This guards against work that runs on the thread's current device instead of the worker's: a
decode worker on ``cuda:1`` once streamed stale tokens because the engine thread (current device
0) recorded its "sampled ids copied" event on GPU 0's stream.
"""

from __future__ import annotations

import re

import httpx
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = "qwen2.5-0.5b"
MAX_LEN = 4096
PROMPTS = [[(i * 7919 + 13 * j) % 150000 + 1 for i in range(n)] for j, n in enumerate((37, 301, 1100, 2600))]
OUT = 48


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from benchmarks.synthetic_tokenizer import write
    from pdmesh.models.arch import arch_from_hf_config
    from pdmesh.models.presets import PRESETS

    return write(arch_from_hf_config(PRESETS[MODEL]).vocab_size, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    """One engine on cuda:0, the workers' configuration (bf16, graphs, async scheduling, 2048-token steps)."""
    from pdmesh.engine import SamplingParams
    from pdmesh.engine.engine import LLMEngine
    from pdmesh.testing import engine_config
    from pdmesh.tokenizer import Tokenizer

    eng = LLMEngine(engine_config(MODEL, device="cuda:0", num_kv_blocks=512, max_model_len=MAX_LEN, max_num_seqs=128,
                                  max_tokens_step=2048))
    greedy = SamplingParams(temperature=0, max_tokens=OUT, ignore_eos=True)
    tok = Tokenizer(str(tokenizer_dir))
    out = []
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, greedy)
        ids: list[int] = []
        while eng.has_work():
            for o in eng.step():
                ids += o.new_token_ids
        out.append(ids_of(tok.decode(ids)))
    del eng
    torch.cuda.empty_cache()
    return out


def ids_of(text: str) -> list[int]:
    """Token ids back from the synthetic tokenizer's text ('t123 t45 ...')."""
    return [int(x) for x in re.findall(r"t(\d+)", text)]


PLACEMENTS = {
    "default (prefill 0, decode 1)": ([], {1: 0, 2: 1}),
    "prefill 1, decode 0": (["--prefill-devices", "1", "--decode-devices", "0"], {1: 1, 2: 0}),
    "prefill 1, decode 1": (["--prefill-devices", "1", "--decode-devices", "1"], {1: 1, 2: 1}),
    "prefill 0, decode 0": (["--prefill-devices", "0", "--decode-devices", "0"], {1: 0, 2: 0}),
    "colocated on 1": (["--prefill", "0", "--decode", "0", "--colocated", "1", "--colocated-devices", "1"], {3: 1}),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_mesh_tokens_on_every_placement_equal_one_engine_on_gpu0(name, reference, tokenizer_dir, tmp_path):
    from tests.meshproc import Mesh

    flags, devices = PLACEMENTS[name]
    if torch.cuda.device_count() < 2 and any(d == 1 for d in devices.values()):
        pytest.skip("needs 2 GPUs")
    mesh = Mesh(tmp_path, extra=["--model", MODEL, "--load-format", "dummy", "--tokenizer", str(tokenizer_dir),
                                 "--max-model-len", str(MAX_LEN), *flags])
    try:
        placed = {w.info.role: w.info.device_index for w in mesh.workers()}
        assert placed == devices, (name, placed)
        for prompt, want in zip(PROMPTS, reference):
            r = httpx.post(mesh.base + "/v1/completions", timeout=300, json={
                "prompt": prompt, "max_tokens": OUT, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            got = ids_of(r.json()["choices"][0]["text"])
            assert got == want, f"{name}: prompt of {len(prompt)} tokens: first difference at token " \
                                f"{next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))}"
        mesh.wait_idle(timeout=30)
    finally:
        rc = mesh.stop()
    assert rc == 0 and mesh.service_pids() == []
