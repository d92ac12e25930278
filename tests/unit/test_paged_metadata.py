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
