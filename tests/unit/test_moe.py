"""The mixture-of-experts layer on CPU: presets with transformers' exact shapes, the grouped expert
kernel against a token-by-token reference, the Triton kernels run by Triton's interpreter against
it, the expert-major block layout, each rank's expert weights under TP and EP, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pdmesh.distributed.group import TPGroup
from pdmesh.models import build_model, check_tensor_parallel
from pdmesh.models.arch import arch_from_hf_config
from pdmesh.models.fused_moe import align
from pdmesh.models.moe import grouped_experts, route
from pdmesh.models.presets import PRESETS

CPU = torch.device("cpu")


def naive_experts(x, gate_up, down, weights, ids, first):
    """Token by token, expert by expert: the definition."""
    out = torch.zeros_like(x)
    inter = down.shape[2]
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - first
            if 0 <= e < gate_up.shape[0]:
                gu = gate_up[e] @ x[t]
                out[t] += weights[t, j] * (down[e] @ (F.silu(gu[:inter]) * gu[inter:]))
    return out


def random_layer(num_experts=8, hidden=48, inter=24, tokens=13, top_k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2
    down = torch.randn(num_experts, hidden, inter, generator=g) * 0.2
    x = torch.randn(tokens, hidden, generator=g)
    weights, ids = route(torch.randn(tokens, num_experts, generator=g) * 3, top_k, True, x.dtype)
    return x, gate_up, down, weights, ids


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "qwen3-235b-a22b"])
def test_presets_have_transformers_shapes(name):
    import transformers

    cfg = {k: v for k, v in PRESETS[name].items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**cfg))
    arch = arch_from_hf_config(PRESETS[name])
    ours = build_model(arch, torch.bfloat16)
    total = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in ours.parameters()) == arch.num_parameters() == total
    assert arch.num_moe_layers == arch.num_layers and arch.num_experts == 128 and arch.num_experts_per_tok == 8
    theirs = hf.model.layers[0].mlp.experts
    mine = ours.model.layers[0].mlp.experts
    assert mine.gate_up_proj.shape == theirs.gate_up_proj.shape and mine.down_proj.shape == theirs.down_proj.shape
    active = {"qwen3-30b-a3b": 3.35e9, "qwen3-235b-a22b": 22.19e9}[name]
    assert abs(arch.num_parameters(active=True) - active) < 0.01e9


@pytest.mark.parametrize("grouped_mm", [True, False])
@pytest.mark.parametrize("first,count", [(0, 8), (2, 3), (6, 2)])
def test_grouped_experts_equal_the_definition(first, count, grouped_mm):
    x, gate_up, down, weights, ids = random_layer()
    want = naive_experts(x, gate_up[first:first + count], down[first:first + count], weights, ids, first)
    got = grouped_experts(x, gate_up[first:first + count], down[first:first + count], weights, ids, first, grouped_mm)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_the_ranks_of_an_expert_split_sum_to_the_whole():
    x, gate_up, down, weights, ids = random_layer()
    whole = grouped_experts(x, gate_up, down, weights, ids, 0)
    by_experts = sum(grouped_experts(x, gate_up[r * 4:(r + 1) * 4], down[r * 4:(r + 1) * 4], weights, ids, r * 4)
                     for r in range(2))
    i = down.shape[2] // 2  # each rank: columns [r*i, (r+1)*i) of every expert's gate, up and down
    by_width = sum(grouped_experts(x, torch.cat([gate_up[:, r * i:(r + 1) * i], gate_up[:, 2 * i + r * i:2 * i + (r + 1) * i]], 1),
                                   down[:, :, r * i:(r + 1) * i], weights, ids, 0) for r in range(2))
    assert torch.allclose(by_experts, whole, atol=1e-5) and torch.allclose(by_width, whole, atol=1e-5)


def test_align_lays_pairs_out_expert_by_expert():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # pairs 0..5: experts 2, 0, 2, 3, 0, 2
    sorted_ids, block_expert, total = align(ids, 0, 4, 4)
    pad = 6
    # expert 0: pairs 1, 4; expert 1: none; expert 2: pairs 0, 2, 5; expert 3: pair 3 (each padded to 4)
    assert sorted_ids.tolist()[:12] == [1, 4, pad, pad, 0, 2, 5, pad, 3, pad, pad, pad]
    # capacity: 6 pairs + 4 experts * 3 padding rows, rounded up to whole blocks; unused rows are padding
    assert sorted_ids.numel() == 20 and set(sorted_ids.tolist()[12:]) == {pad}
    assert block_expert.tolist()[:3] == [0, 2, 3] and total.tolist() == [12]
    # experts 2..3 on this rank (expert parallelism): pairs of experts 0..1 are nobody's here
    sorted_ids, block_expert, total = align(ids, 2, 2, 4)
    assert sorted_ids.tolist() == [0, 2, 5, pad, 3, pad, pad, pad, pad, pad, pad, pad]
    assert block_expert.tolist()[:2] == [0, 1]
    assert total.tolist() == [8]


_INTERPRETED = r"""
import torch
from pdmesh.models.fused_moe import Tiles, fused_experts, tiles_for
from pdmesh.models.moe import grouped_experts, route
from tests.unit.test_moe import random_layer
cases = 0
for tokens, top_k in ((1, 2), (7, 3), (40, 2)):
    x, gate_up, down, weights, ids = random_layer(num_experts=6, hidden=40, inter=24, tokens=tokens, top_k=top_k, seed=tokens)
    for first, count in ((0, 6), (2, 3)):
        gu, dn = gate_up[first:first + count], down[first:first + count]
        want = grouped_experts(x, gu, dn, weights, ids, first)
        for tiles in (Tiles(16, 16, 16), Tiles(32, 32, 16, group_m=2), tiles_for(tokens * top_k, count)):
            got = fused_experts(x, gu, dn, weights, ids, first, every_expert=count == 6, tiles=tiles)
            err = (got - want).abs().max().item()
            assert err < 1e-5, (tokens, first, tiles, err)
            cases += 1
print("OK", cases)
"""


def test_triton_kernels_in_the_interpreter_equal_the_grouped_kernel():
    """The fused path's Triton kernels, run by Triton's CPU interpreter (fp32, exact dots): every
    tile shape, K not a multiple of the tile, blocks with padding rows, an expert-parallel rank."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK 18" in out.stdout, out.stderr[-3000:]


def _moe_arch(**kw):
    cfg = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=48,
               moe_intermediate_size=12, num_experts=6, num_experts_per_tok=2, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return arch_from_hf_config({**cfg, **kw})


def test_each_rank_holds_its_experts():
    arch = _moe_arch(decoder_sparse_step=1)
    g = torch.Generator().manual_seed(1)
    full = {"gate_up_proj": torch.randn(6, 24, 32, generator=g), "down_proj": torch.randn(6, 32, 12, generator=g)}
    for ep in (False, True):
        for rank in range(2):
            model = build_model(arch, torch.float32, TPGroup(rank, 2, CPU), expert_parallel=ep)
            model.materialize(CPU, 16)
            for what, t in full.items():
                model.copy_shard(f"model.layers.1.mlp.experts.{what}", getattr(model.model.layers[1].mlp.experts, what), t)
            ex = model.model.layers[1].mlp.experts
            if ep:  # experts 0-2 / 3-5 whole
                assert torch.equal(ex.gate_up_proj, full["gate_up_proj"][rank * 3:(rank + 1) * 3])
                assert torch.equal(ex.down_proj, full["down_proj"][rank * 3:(rank + 1) * 3])
            else:  # columns 0-5 / 6-11 of every expert's width: gate rows, then up rows
                gu = full["gate_up_proj"]
                assert torch.equal(ex.gate_up_proj, torch.cat([gu[:, rank * 6:(rank + 1) * 6], gu[:, 12 + rank * 6:12 + (rank + 1) * 6]], 1))
                assert torch.equal(ex.down_proj, full["down_proj"][:, :, rank * 6:(rank + 1) * 6])
            one = torch.randn(12, 32, generator=g)  # expert 4's up_proj from a per-expert checkpoint
            ex.copy_expert(4, "up_proj", one)
            if ep:
                assert rank == 0 or torch.equal(ex.gate_up_proj[1, 12:], one)
            else:
                assert torch.equal(ex.gate_up_proj[4, 6:], one[rank * 6:(rank + 1) * 6])


def test_clear_errors():
    with pytest.raises(ValueError, match="experts do not divide over 4 ranks"):
        check_tensor_parallel(_moe_arch(), 4, expert_parallel=True)
    with pytest.raises(ValueError, match="expert width 12 does not divide over 8 ranks"):
        check_tensor_parallel(_moe_arch(num_attention_heads=8, num_key_value_heads=8), 8)
    check_tensor_parallel(_moe_arch(), 2, expert_parallel=True)
    check_tensor_parallel(_moe_arch(intermediate_size=47), 2)  # no dense layer: its width does not matter
    with pytest.raises(ValueError, match="MLP width 47"):
        check_tensor_parallel(_moe_arch(intermediate_size=47, mlp_only_layers=[0]), 2)
    with pytest.raises(ValueError, match="has no experts"):
        check_tensor_parallel(arch_from_hf_config({**PRESETS["qwen3-8b"]}), 2, expert_parallel=True)
    with pytest.raises(ValueError, match="num_experts_per_tok 7"):
        _moe_arch(num_experts_per_tok=7)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        _moe_arch(hidden_act="gelu")
