"""Block copies between pools (the torch fallback path on CPU; the Triton path runs in tests/gpu)."""

import torch

from pdmesh.kv.copy import copy_blocks


def test_copy_blocks_moves_whole_blocks_for_every_layer():
    src = torch.randn(3, 10, 2, 4, 2, 8)
    dst = torch.zeros(3, 7, 2, 4, 2, 8)
    copy_blocks(src, torch.tensor([9, 0, 4]), dst, torch.tensor([1, 6, 2]))
    for s, d in ((9, 1), (0, 6), (4, 2)):
        assert torch.equal(dst[:, d], src[:, s])
    assert dst[:, [0, 3, 4, 5]].abs().sum() == 0
