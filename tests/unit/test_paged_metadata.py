"""The CSR page table FlashInfer's wrappers are planned with (host side, no GPU needed)."""

import torch

from pdmesh.attention.base import BatchLayout
from pdmesh.attention.paged import paged_metadata


def test_csr_page_table_exact():
    b = BatchLayout(query_lens=[5, 1, 3], context_lens=[5, 13, 8], block_tables=[[7, 9], [1, 2, 3, 4, 5], [6, 8]],
                    slot_mapping=torch.zeros(9, dtype=torch.int64), block_size=4)
    m = paged_metadata(b)
    assert m.qo_indptr.tolist() == [0, 5, 6, 9]
    assert m.kv_indptr.tolist() == [0, 2, 6, 8]  # pages used: 2, 4 (block 5 is allocated ahead, unused), 2
    assert m.kv_indices.tolist() == [7, 9, 1, 2, 3, 4, 6, 8]
    assert m.kv_last_page_len.tolist() == [1, 1, 4]


def test_cuda_graph_padding_plans_real_rows_then_null_block_rows():
    from pdmesh.engine.cuda_graphs import DecodeGraphs

    g = DecodeGraphs.__new__(DecodeGraphs)  # the host-side part only (capture needs CUDA)
    g.block_size, g.null_block, g.slot_block = 4, 99, torch.zeros(8, dtype=torch.int64)
    real = BatchLayout([1, 1], [5, 13], [[7, 9], [1, 2, 3, 4, 5]], torch.zeros(2, dtype=torch.int64), 4)
    m = paged_metadata(g._padded_layout(real, 4))
    assert m.kv_indptr.tolist() == [0, 2, 6, 7, 8]
    assert m.kv_indices.tolist() == [7, 9, 1, 2, 3, 4, 99, 99]
    assert m.kv_last_page_len.tolist() == [1, 1, 1, 1]
    assert paged_metadata(g._padded_layout(None, 2)).kv_indices.tolist() == [99, 99]


def test_store_kv_one_kernel_path_equals_two_writes():
    """k and v as views of one qkv row (v right after k) are stored with one index_put; anything
    else with two; both put exactly k and v into their slots."""
    import torch

    from pdmesh.attention.paged import _kv_rows, store_kv

    t, hq, h, d, n, bs = 5, 4, 2, 8, 6, 4
    qkv = torch.randn(t, (hq + 2 * h) * d)
    _, k, v = qkv.split([hq * d, h * d, h * d], -1)
    k, v = k.view(t, h, d), v.view(t, h, d)
    assert _kv_rows(k, v) is not None and _kv_rows(k.contiguous(), v.contiguous()) is None
    assert _kv_rows(v, k) is None  # v before k: not the [k, v] layout
    slot_block, slot_offset = torch.tensor([0, 3, 3, 5, 1]), torch.tensor([0, 1, 2, 3, 0])
    want = torch.zeros(n, 2, bs, h, d)
    want[:, 0][slot_block, slot_offset] = k
    want[:, 1][slot_block, slot_offset] = v
    for kk, vv in ((k, v), (k.contiguous(), v.contiguous())):
        got = torch.zeros(n, 2, bs, h, d)
        store_kv(got, slot_block, slot_offset, kk, vv)
        assert torch.equal(got, want)


def test_store_kv_back_to_back_tensors_of_separate_storages_take_two_writes():
    """One token's k and v allocated separately can sit back to back in memory (the GPU allocator
    does this); they are not one buffer, so the one-kernel view must not be taken (it would reach
    past k's storage)."""
    import torch

    from pdmesh.attention.paged import _kv_rows, store_kv

    h, d = 2, 8
    buf = bytearray(2 * h * d * 4)
    k = torch.frombuffer(buf, dtype=torch.float32, count=h * d, offset=0).view(1, h, d)
    v = torch.frombuffer(buf, dtype=torch.float32, count=h * d, offset=h * d * 4).view(1, h, d)
    k.copy_(torch.arange(h * d, dtype=torch.float32).view(1, h, d))
    v.copy_(-torch.arange(h * d, dtype=torch.float32).view(1, h, d))
    assert v.data_ptr() - k.data_ptr() == h * d * 4 and _kv_rows(k, v) is None
    got = torch.zeros(3, 2, 4, h, d)
    store_kv(got, torch.tensor([2]), torch.tensor([1]), k, v)
    assert torch.equal(got[2, 0, 1], k[0]) and torch.equal(got[2, 1, 1], v[0]) and got.abs().sum() == 2 * k.abs().sum()
