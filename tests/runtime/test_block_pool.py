"""Tests of `BlockPool`: the null block, refcounts, the LRU free list and cached-hash eviction."""

from __future__ import annotations

import pytest

from pgen_runtime import NULL_BLOCK_ID, BlockPool, ConfigError, OutOfBlocksError
from pgen_runtime.block_pool import Block, FreeBlockQueue


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool._free]


def test_null_block_is_never_handed_out():
    pool = BlockPool(8)
    taken = pool.allocate(7)
    assert NULL_BLOCK_ID not in [b.block_id for b in taken]
    assert pool.num_usable == 7 and pool.num_free == 0 and pool.num_used == 7
    assert all(b.ref_cnt == 1 for b in taken)


def test_allocate_more_than_free_raises_and_takes_nothing():
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(OutOfBlocksError, match="only 1 blocks are free"):
        pool.allocate(2)
    assert pool.num_free == 1


@pytest.mark.parametrize("num_blocks", [0, 1, 2.0, True])
def test_pool_size_is_checked(num_blocks):
    with pytest.raises(ConfigError, match="num_blocks"):
        BlockPool(num_blocks)


def test_freed_blocks_join_the_tail_in_lru_order():
    pool = BlockPool(6)
    a, b, c = pool.allocate(3)
    pool.free([c, b, a])
    assert free_ids(pool) == [4, 5, c.block_id, b.block_id, a.block_id]
    assert [x.block_id for x in pool.allocate(3)] == [4, 5, c.block_id]


def test_shared_block_is_free_only_after_the_last_reference():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.touch(block)
    pool.free([block])
    assert block.ref_cnt == 1 and block.block_id not in free_ids(pool)
    pool.free([block])
    assert block.ref_cnt == 0 and free_ids(pool)[-1] == block.block_id


def test_touch_removes_a_cached_free_block_from_the_middle():
    pool = BlockPool(6)
    blocks = pool.allocate(5)
    pool.cache(blocks[2], "h")
    pool.free(blocks)
    assert pool.lookup("h") is blocks[2]
    pool.touch(blocks[2])
    assert blocks[2].ref_cnt == 1 and pool.num_free == 4
    assert free_ids(pool) == [1, 2, 4, 5]
    assert blocks[2].prev is None and blocks[2].next is None


def test_allocation_evicts_cached_blocks_lru_first():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    pool.cache(a, "a")
    pool.cache(b, "b")
    pool.free([b])
    pool.free([a])
    pool.free([c])
    (taken,) = pool.allocate(1)
    assert taken is b and pool.lookup("b") is None and pool.lookup("a") is a
    assert pool.num_evictions == 1 and taken.block_hash is None


def test_a_second_block_with_the_same_hash_is_not_recorded():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache(a, "h")
    pool.cache(b, "h")
    assert pool.lookup("h") is a and b.block_hash is None


def test_reset_prefix_cache_forgets_only_free_blocks():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache(a, "a")
    pool.cache(b, "b")
    pool.free([a])
    assert pool.reset_prefix_cache() == 1
    assert pool.lookup("a") is None and pool.lookup("b") is b


def test_free_queue_operations_are_consistent():
    blocks = [Block(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.remove(blocks[0])
    queue.append(blocks[2])
    assert [b.block_id for b in queue] == [1, 3, 4, 2] and queue.num_free == 4
    assert queue.popleft() is blocks[1]
    assert [b.block_id for b in queue] == [3, 4, 2] and queue.num_free == 3
