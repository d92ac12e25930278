"""BatchLayout.as_decode_rows: a multi-token query block as one-query rows, each causally cut."""

import numpy as np
import torch

from pdmesh.attention.base import BatchLayout


def test_rows_cut_the_context_causally_and_share_the_block_table():
    t0, t1 = np.array([3, 4], dtype=np.int32), np.array([7], dtype=np.int32)
    lay = BatchLayout([3, 1], [10, 5], [t0, t1], torch.arange(4), 8)
    rows = lay.as_decode_rows()
    assert rows.query_lens == [1, 1, 1, 1] and rows.context_lens == [8, 9, 10, 5]
    assert [list(t) for t in rows.block_tables] == [[3, 4], [3, 4], [3, 4], [7]]
    assert rows.is_decode_only and rows.slot_mapping is lay.slot_mapping
