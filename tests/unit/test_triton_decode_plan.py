"""Host-side choices of the Triton decode attention (the kernel itself is checked on the GPU machine
against the torch backend: tests/gpu)."""

import numpy as np
import pytest
import torch

from pdmesh.attention.paged import PagedMetadata
from pdmesh.attention.triton_decode import MAX_SPLITS, context_lens, pick_decode_kernel, pick_splits, pick_tiles
from pdmesh.config import DeviceConfig


def test_splits_fill_two_waves_of_sms_and_stay_bounded():
    assert pick_splits(1, 2, 132) == MAX_SPLITS            # 264 programs wanted, capped
    assert pick_splits(64, 2, 132) == 3                    # 128 (seq, head) pairs -> 384 programs
    assert pick_splits(128, 8, 132) == 1                   # already 1024 programs
    assert pick_splits(4, 8, 132) == 9


def test_tiles_as_swept_on_the_gpu_machine():
    assert pick_tiles(3, 64, 2) == (128, 3)    # qwen2.5-0.5b, batch 64: 16 KB tiles, 3 stages
    assert pick_tiles(64, 64, 2) == (64, 2)    # qwen2.5-0.5b, batch 1: 8 KB tiles
    assert pick_tiles(1, 128, 2) == (64, 2)    # llama-3.1-8b, batch 64
    assert pick_tiles(33, 128, 2) == (32, 2)   # llama-3.1-8b, batch 1
    assert pick_tiles(1, 256, 4) == (32, 2)    # never below 32 tokens


def test_context_lens_from_the_page_table():
    m = PagedMetadata(None, np.array([0, 1, 3, 7], dtype=np.int32), np.arange(7, dtype=np.int32),
                      np.array([1, 16, 5], dtype=np.int32))
    assert context_lens(m, 16).tolist() == [1, 32, 53]


def test_auto_takes_flashinfer_without_triton_on_cuda_and_triton_needs_cuda():
    cpu = torch.device("cpu")
    assert pick_decode_kernel("auto", cpu, 14, 2, 64) == "flashinfer"  # no Triton kernels off CUDA
    assert pick_decode_kernel("flashinfer", cpu, 14, 2, 64) == "flashinfer"
    with pytest.raises(RuntimeError, match="needs Triton on a CUDA device"):
        pick_decode_kernel("triton", cpu, 14, 2, 64)


def test_auto_rule_on_cuda_groups_and_head_dims(monkeypatch):
    """Groups of 4+ with a power-of-two head dim take Triton; groups 1-3 and head dims like 80 or 96
    keep FlashInfer, and forcing Triton there is a clear error."""
    import pdmesh.attention.triton_decode as td

    monkeypatch.setattr(td, "triton_decode_available", lambda device: True)
    cuda = torch.device("cuda")
    assert td.pick_decode_kernel("auto", cuda, 14, 2, 64) == "triton"
    assert td.pick_decode_kernel("auto", cuda, 32, 8, 128) == "triton"
    assert td.pick_decode_kernel("auto", cuda, 16, 8, 128) == "flashinfer"
    assert td.pick_decode_kernel("auto", cuda, 32, 8, 80) == "flashinfer"
    with pytest.raises(RuntimeError, match="power-of-two head dim >= 16, not 96"):
        td.pick_decode_kernel("triton", cuda, 32, 8, 96)


def test_decode_attention_flag_is_validated():
    assert DeviceConfig(decode_attention="triton").decode_attention == "triton"
    with pytest.raises(ValueError, match="--decode-attention: .cudnn. is not one of auto, flashinfer, triton"):
        DeviceConfig(decode_attention="cudnn")
