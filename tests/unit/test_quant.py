"""Online quantization parts on CPU: quantized layers against float32 within stated bounds, which
layers get quantized, the fp8 KV pool (clamped stores, half the bytes of bf16, block moves), flags.

Bounds (relative Frobenius error of a layer's output against float32, Gaussian inputs and weights;
measured about 0.9% for int8 and 3.7% for fp8): int8 <= 2%, fp8 <= 6%."""

import argparse
import dataclasses

import pytest
import torch
from torch import nn

from pdmesh.attention.paged import to_kv_dtype
from pdmesh.config import CacheConfig, ConfigError, EngineConfig, ModelConfig
from pdmesh.kv.copy import copy_blocks, copy_heads
from pdmesh.kv.pool import KVCachePool, KVLayout
from pdmesh.models.arch import arch_from_hf_config
from pdmesh.models.presets import PRESETS
from pdmesh.models.quant import FP8, QuantLinear, check_quantization, quant_error, quantize_model, quantize_rows

BOUND = {"int8": 0.02, "fp8": 0.06}


def linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, std=k ** -0.5)
    return lin


@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_layer_error_against_float32_within_bounds(method, dtype, rows):
    ref = linear(576, 1536)
    q = QuantLinear(linear(576, 1536).to(dtype), method)
    x = torch.randn(rows, 576)
    err = quant_error(q, ref, x)
    assert err <= BOUND[method], (method, dtype, rows, err)
    assert err > 1e-4  # it is quantized (not a float copy)
    assert q.weight.dtype == (FP8 if method == "fp8" else torch.int8) and q.weight.element_size() == 1


def test_shapes_the_kernels_cannot_take_and_outlier_rows():
    ref = linear(40, 24)  # fp8: K, N not multiples of 16 -> the dequantized path, same numerics
    q = QuantLinear(linear(40, 24), "fp8")
    assert not q.use_kernel
    assert quant_error(q, ref, torch.randn(3, 40)) <= BOUND["fp8"]
    # per-token scales: a row with a huge outlier does not spoil the other rows
    q8, ref8 = QuantLinear(linear(64, 32), "int8"), linear(64, 32)
    x = torch.randn(4, 64)
    x[0, 3] = 1e4
    with torch.no_grad():
        assert torch.equal(q8(x)[1:], q8(x[1:]))
    with torch.no_grad():
        out = q8(torch.cat([torch.zeros(1, 64), x]))
    assert torch.isfinite(out).all() and torch.allclose(out[0], ref8.bias.detach(), atol=1e-6)


def test_quantize_rows_ranges():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1e3, 10.0, -1e3]])
    q, s = quantize_rows(x, torch.int8)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and torch.isfinite(s).all()
    assert torch.allclose(q.float() * s, x, atol=float(s.max()) / 2 + 1e-6)
    f, fs = quantize_rows(x, FP8)
    assert f.float().abs().max() == 448 and torch.allclose((f.float() * fs)[2], x[2], rtol=0.07)


def test_quantize_model_replaces_the_projections_only():
    from pdmesh.models import build_model

    arch = dataclasses.replace(arch_from_hf_config(PRESETS["smollm2-135m"]), num_layers=2)
    model = build_model(arch, torch.float32)
    model.materialize(torch.device("cpu"), 64)
    from pdmesh.models.loader import fill_dummy

    fill_dummy(model, 0)
    assert quantize_model(model, "int8") == 2 * 4
    layer = model.model.layers[0]
    for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(m, QuantLinear) and m.method == "int8"
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
    assert not any(isinstance(m, QuantLinear) for m in (model.model.embed_tokens, model.model.norm))
    assert quantize_model(model, None) == 0
    with pytest.raises(ValueError, match="--quantization: unknown method 'nf4'"):
        quantize_model(model, "nf4")  # type: ignore[arg-type]


def test_mixture_of_experts_models_are_refused_naming_the_flag():
    """Experts (most of an MoE model's weights) have no quantized kernel: refused, never half done."""
    from pdmesh.engine.engine import LLMEngine
    from pdmesh.testing import engine_config

    arch = arch_from_hf_config(PRESETS["qwen3-30b-a3b"])
    with pytest.raises(ValueError, match=r"--quantization int8: mixture-of-experts models \(Qwen3MoeForCausalLM"):
        check_quantization(arch, "int8")
    check_quantization(arch, None)
    check_quantization(arch_from_hf_config(PRESETS["smollm2-135m"]), "fp8")
    with pytest.raises(ValueError, match="--quantization fp8: mixture-of-experts"):  # before any weight is built
        LLMEngine(engine_config("qwen3-30b-a3b", device="cpu", dtype="float32", quantization="fp8", num_kv_blocks=4))


def test_flags_and_validation():
    p = argparse.ArgumentParser()
    EngineConfig.add_flags(p)
    cfg = EngineConfig.from_flags(p.parse_args(["--quantization", "fp8", "--kv-cache-dtype", "fp8"]))
    assert cfg.model.quantization == "fp8" and cfg.cache.kv_cache_dtype == "fp8"
    assert EngineConfig.from_flags(p.parse_args([])).model.quantization is None
    with pytest.raises(SystemExit):
        p.parse_args(["--quantization", "nf4"])
    with pytest.raises(ConfigError, match="--quantization"):
        ModelConfig(quantization="awq")
    with pytest.raises(ConfigError, match="--kv-cache-dtype"):
        CacheConfig(kv_cache_dtype="int4")


# ---------------------------------------------------------------- fp8 KV pool
def test_fp8_kv_values_are_clamped_and_blocks_are_half_of_bf16():
    x = torch.tensor([1000.0, -1000.0, 1.5, 0.0])
    assert to_kv_dtype(x, FP8).float().tolist() == [448.0, -448.0, 1.5, 0.0]
    assert to_kv_dtype(x, torch.float32) is x
    bf16 = KVLayout(30, 3, 64, 32, "bfloat16")
    fp8 = KVLayout(30, 3, 64, 32, "float8_e4m3fn")
    assert fp8.block_bytes * 2 == bf16.block_bytes


def test_fp8_pool_moves_blocks_exactly():
    arch = arch_from_hf_config(PRESETS["smollm2-135m"])
    a = KVCachePool(arch, 6, 4, FP8, torch.device("cpu"))
    b = KVCachePool(arch, 6, 4, FP8, torch.device("cpu"))
    a.kv.copy_(to_kv_dtype(torch.randn(a.kv.shape), FP8))
    b.write_heads(0, [0, 5], None, a.read_heads(0, [4, 1]))
    assert torch.equal(b.kv[:, [0, 5]].view(torch.uint8), a.kv[:, [4, 1]].view(torch.uint8))
    b.write_heads(0, [1], (1, 3), a.read_heads(0, [2], (1, 3)))  # some heads (tensor parallelism of other sizes)
    assert torch.equal(b.kv[:, 1, :, :, 1:3].view(torch.uint8), a.kv[:, 2, :, :, 1:3].view(torch.uint8))
    copy_heads(a.kv, torch.tensor([3]), (0, 2), b.kv, torch.tensor([2]), (1, 3))
    assert torch.equal(b.kv[:, 2, :, :, 1:3].view(torch.uint8), a.kv[:, 3, :, :, 0:2].view(torch.uint8))
    assert torch.equal(a.logical_block(4, 3).view(torch.uint8), a.kv[:, 4, :, :3].view(torch.uint8))
    copy_blocks(a.kv, torch.tensor([2]), b.kv, torch.tensor([3]))
    assert torch.equal(b.kv[:, 3].view(torch.uint8), a.kv[:, 2].view(torch.uint8))
    assert a.layout.dtype == "float8_e4m3fn"


def test_fp8_refused_below_compute_capability_8_9(monkeypatch):
    import torch

    from pdmesh.models.quant import check_device

    check_device(torch.device("cpu"), "fp8")  # the CPU path has the kernels
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    check_device(torch.device("cuda", 0), "int8")
    with pytest.raises(ValueError, match=r"--quantization fp8 needs .* A100 is 8\.0: use --quantization int8"):
        check_device(torch.device("cuda", 0), "fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    check_device(torch.device("cuda", 0), "fp8")
