"""Allocator tests with exact block ids (the algorithm is documented in block_manager.py)."""

import numpy as np
import pytest

from pdmesh.kv.block_manager import PrefixCachingBlockManager, hash_block


def toks(n, start=0):
    return list(range(start, start + n))


def test_allocate_pops_lowest_ids_in_order():
    bm = PrefixCachingBlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 9) == [0, 1, 2]
    assert bm.allocate("b", 4) == [3]
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_free_blocks == 4
    # extending within the last block allocates nothing; crossing a boundary one block
    assert bm.allocate("b", 4) == []
    assert bm.allocate("b", 5) == [4]
    bm.check_invariants()


def test_allocation_failure_changes_nothing():
    bm = PrefixCachingBlockManager(num_blocks=4, block_size=4)
    assert bm.allocate("a", 12) == [0, 1, 2]
    assert bm.allocate("b", 8) is None
    assert not bm.has_request("b")
    assert bm.num_free_blocks == 1
    bm.check_invariants()


def test_free_order_unhashed_to_front_cached_to_back():
    bm = PrefixCachingBlockManager(num_blocks=6, block_size=4)
    t = toks(10)
    bm.allocate("a", 10)  # blocks 0,1,2 ; 0 and 1 full
    bm.cache_full_blocks("a", t, 10)
    assert bm.block_hash[0] is not None and bm.block_hash[1] is not None and bm.block_hash[2] is None
    bm.free("a")
    # free queue: unhashed 2 to the front, then the never-used 3,4,5, then cached tail-first 1, 0
    assert list(bm.free_queue) == [2, 3, 4, 5, 1, 0]
    bm.check_invariants()


def test_prefix_hit_shares_blocks_and_counts():
    bm = PrefixCachingBlockManager(num_blocks=8, block_size=4)
    t = toks(10)
    bm.allocate("a", 10)
    bm.cache_full_blocks("a", t, 10)
    hit = bm.lookup_prefix(t + [99])
    assert hit.block_ids == (0, 1) and hit.num_tokens == 8
    assert bm.allocate("b", 11, hit) == [3]
    assert bm.block_table("b") == [0, 1, 3]
    assert bm.ref_count[0] == 2 and bm.ref_count[1] == 2
    bm.record_prefix_query(11, 8)
    assert (bm.prefix_queries, bm.prefix_hits) == (11, 8)
    bm.check_invariants()


def test_lookup_never_covers_the_last_token():
    bm = PrefixCachingBlockManager(num_blocks=8, block_size=4)
    t = toks(8)
    bm.allocate("a", 8)
    bm.cache_full_blocks("a", t, 8)
    # exactly two full blocks: only the first may be reused (the last token must be computed)
    assert bm.lookup_prefix(t).block_ids == (0,)


def test_hit_on_freed_cached_blocks_revives_them():
    bm = PrefixCachingBlockManager(num_blocks=6, block_size=4)
    t = toks(9)
    bm.allocate("a", 9)
    bm.cache_full_blocks("a", t, 9)
    bm.free("a")
    assert bm.num_free_blocks == 6
    hit = bm.lookup_prefix(t)
    assert hit.block_ids == (0, 1)
    fresh = bm.allocate("b", 9, hit)
    # block 2 (unhashed, at the front) is reused for the partial tail
    assert fresh == [2]
    assert bm.block_table("b") == [0, 1, 2]
    assert bm.num_free_blocks == 3
    bm.check_invariants()


def test_eviction_takes_least_recently_freed_and_forgets_hash():
    bm = PrefixCachingBlockManager(num_blocks=4, block_size=2)
    ta, tb = toks(4), toks(4, 100)
    bm.allocate("a", 4)
    bm.cache_full_blocks("a", ta, 4)
    bm.free("a")  # queue: 2,3,1,0
    assert list(bm.free_queue) == [2, 3, 1, 0]
    bm.allocate("b", 4)  # takes 2,3
    bm.cache_full_blocks("b", tb, 4)
    bm.free("b")  # queue: 1,0,3,2
    assert list(bm.free_queue) == [1, 0, 3, 2]
    assert bm.allocate("c", 6) == [1, 0, 3]  # evicts a's blocks first, then b's tail
    assert bm.lookup_prefix(ta + [7]).block_ids == ()
    assert bm.lookup_prefix(tb + [7]).block_ids == (2,)
    bm.check_invariants()


def test_duplicate_content_is_not_double_cached():
    bm = PrefixCachingBlockManager(num_blocks=6, block_size=2)
    t = toks(4)
    bm.allocate("a", 4)
    bm.allocate("b", 4)  # computed independently, same content
    bm.cache_full_blocks("a", t, 4)
    bm.cache_full_blocks("b", t, 4)
    assert bm.cached[hash_block(None, t[:2])] == 0
    assert bm.block_hash[2] is None and bm.block_hash[3] is None
    bm.free("b")
    assert list(bm.free_queue)[:2] == [2, 3]
    bm.check_invariants()


def test_free_returns_every_block_and_unknown_is_noop():
    bm = PrefixCachingBlockManager(num_blocks=5, block_size=4)
    bm.allocate("a", 20)
    assert bm.num_free_blocks == 0
    assert bm.free("a") == 5
    assert bm.free("a") == 0
    assert bm.num_free_blocks == 5
    bm.check_invariants()


def test_prefix_caching_disabled():
    bm = PrefixCachingBlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    t = toks(4)
    bm.allocate("a", 4)
    bm.cache_full_blocks("a", t, 4)
    assert bm.cached == {} and bm.lookup_prefix(t + [1]).num_tokens == 0


def test_chained_hash_depends_on_parent():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])


def test_bad_sizes():
    with pytest.raises(ValueError):
        PrefixCachingBlockManager(0, 4)


def test_table_array_follows_the_table_and_covered_allocations_change_nothing():
    bm = PrefixCachingBlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    arr = bm.block_table_array("a")
    assert arr.dtype == np.int32 and arr.tolist() == [0, 1]
    assert bm.block_table_array("a") is arr  # unchanged table: the same array, not rebuilt
    assert bm.allocate("a", 8) == [] and bm.num_free_blocks == 6  # still covered by two blocks
    assert bm.allocate("b", 4) == [2]
    assert bm.allocate("a", 9) == [3]
    assert bm.block_table_array("a").tolist() == [0, 1, 3]
    bm.free("a")
    assert bm.allocate("a", 1) == [0]  # a new request under the old id: its own table
    assert bm.block_table_array("a").tolist() == [0]
    bm.check_invariants()
