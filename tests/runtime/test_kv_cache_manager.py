"""Tests of `KVCacheManager`, one operation at a time, with the kernels of device_kv.make_kernels."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from device_kv import SPEC, make_kernels, make_kv

from pgen_runtime import (
    NULL_BLOCK_ID,
    ConfigError,
    KVCacheManager,
    OutOfBlocksError,
    PreemptionPolicy,
    SequenceError,
    SeqStatus,
    ShapeError,
)

BS = SPEC.block_size


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def snapshot(m: KVCacheManager) -> tuple:
    """Everything an invalid call must leave unchanged."""
    tables = {s: (m.status(s), m.num_tokens(s), tuple(m._seqs[s].block_ids)) for s in m.seq_ids}
    refs = tuple(b.ref_cnt for b in m.block_pool.blocks)
    return tables, refs, m.block_pool.num_free, m.host_pool.num_free, m.metrics()


def blocks_bytes(m: KVCacheManager, seq_id) -> list[np.ndarray]:
    ids = m.block_table(seq_id)
    return [pool[ids].copy() for pool in m.kv.pools]


def test_kernels_match_the_numpy_reference():
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((6, 2, 1, BS, 32)).astype(np.float32)
    expected, got = pool.copy(), pool.copy()
    pairs = np.array([[1, 4], [2, 5]], dtype=np.int32)
    expected = reference.copy_blocks(expected, pairs)
    make_kernels(SPEC).copy_blocks(got, pairs)
    np.testing.assert_array_equal(got, expected)
    host = np.empty((2, *pool.shape[1:]), np.float32)
    make_kernels(SPEC).swap_out(pool, np.array([3, 1], np.int32), host)
    np.testing.assert_array_equal(host, pool[[3, 1]])
    make_kernels(SPEC).swap_in(host, np.array([5, 2], np.int32), got)
    np.testing.assert_array_equal(got[[5, 2]], pool[[3, 1]])


def test_tables_grow_on_demand_and_free_returns_every_block():
    m = KVCacheManager(10, BS, watermark=0.0)
    assert m.allocate_slots("a", 5, tokens(5)) == []
    assert len(m.block_table("a")) == 2
    for _ in range(3):
        m.allocate_slots("a", 1, [7])
    assert len(m.block_table("a")) == 2 and m.num_tokens("a") == 8
    m.allocate_slots("a", 1, [7])
    assert len(m.block_table("a")) == 3
    m.free("a")
    assert m.block_pool.num_free == 9 and m.seq_ids == []


def test_slot_mapping_and_padded_block_tables():
    m = KVCacheManager(10, BS)
    m.allocate_slots("a", 6, tokens(6))
    m.allocate_slots("b", 2, tokens(2, 500))
    table = m.block_table("a")
    expected = [table[p // BS] * BS + p % BS for p in range(6)]
    assert m.slot_mapping("a", 6).tolist() == expected
    assert m.slot_mapping("a", 2).tolist() == expected[-2:]
    assert m.slot_mapping("a", 2).dtype == np.int32
    rows = m.block_tables(["a", "b"])
    assert rows.dtype == np.int32 and rows.shape == (2, 2)
    assert rows[1].tolist() == [m.block_table("b")[0], NULL_BLOCK_ID]
    assert m.block_table("b", width=4).tolist() == m.block_table("b") + [NULL_BLOCK_ID] * 3
    with pytest.raises(ShapeError, match="width=1"):
        m.block_tables(["a"], width=1)
    with pytest.raises(ShapeError, match="num_new_tokens=7"):
        m.slot_mapping("a", 7)


def test_full_pool_returns_none_and_changes_nothing():
    m = KVCacheManager(5, BS, watermark=0.0)
    m.allocate_slots("a", 3 * BS, tokens(3 * BS))
    before = snapshot(m)
    assert not m.can_allocate("b", 2 * BS)
    assert m.allocate_slots("b", 2 * BS, tokens(2 * BS, 900)) is None
    assert snapshot(m) == before
    assert m.can_allocate("a", BS) and m.allocate_slots("a", BS) == []


def test_watermark_holds_back_admission_but_not_growth():
    m = KVCacheManager(21, BS, watermark=0.1)  # 20 usable, 2 held back
    assert m.watermark_blocks == 2
    m.allocate_slots("a", 18 * BS)
    assert not m.can_allocate("b", BS)
    assert m.can_allocate("a", 2 * BS) and m.allocate_slots("a", 2 * BS) == []


def test_request_longer_than_the_pool_raises_and_changes_nothing():
    m = KVCacheManager(5, BS, watermark=0.0)
    m.allocate_slots("a", 2)
    before = snapshot(m)
    for seq_id, n in (("b", 4 * BS + 1), ("a", 4 * BS - 1)):
        with pytest.raises(OutOfBlocksError, match="pool holds 4"):
            m.can_allocate(seq_id, n)
        with pytest.raises(OutOfBlocksError, match="raise num_blocks"):
            m.allocate_slots(seq_id, n)
    assert snapshot(m) == before


def test_a_prompt_that_only_fits_into_the_watermark_can_never_be_admitted():
    m = KVCacheManager(11, BS, watermark=0.2)  # 10 usable, 2 held back
    with pytest.raises(OutOfBlocksError, match="pool holds 8 \\(watermark 2 excluded\\)"):
        m.can_allocate("a", 9 * BS)
    assert m.allocate_slots("a", 8 * BS) == [] and m.allocate_slots("a", 2 * BS) == []


def test_invalid_requests_raise_typed_errors_and_change_nothing():
    m = KVCacheManager(10, BS)
    m.allocate_slots("a", 3, tokens(3), extra_keys=("lora-1",))
    m.allocate_slots("gone", 1)
    m.free("gone")
    before = snapshot(m)
    cases = [
        (ShapeError, "token_ids has 2", lambda: m.allocate_slots("a", 3, [1, 2])),
        (ShapeError, "num_new_tokens=-1", lambda: m.allocate_slots("a", -1)),
        (SequenceError, "extra keys are fixed", lambda: m.allocate_slots("a", 1, [1], ("lora-2",))),
        (SequenceError, "already freed", lambda: m.free("gone")),
        (SequenceError, "already freed", lambda: m.allocate_slots("gone", 1)),
        (SequenceError, "does not exist", lambda: m.free("nope")),
        (SequenceError, "does not exist", lambda: m.fork("nope", "c")),
        (SequenceError, "already exists", lambda: m.fork("a", "a")),
        (SequenceError, "already exists or was freed", lambda: m.fork("a", "gone")),
        (SequenceError, "does not exist", lambda: m.block_table("nope")),
        (ConfigError, "kv=None", lambda: m.apply_copies([(1, 2)])),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
        assert snapshot(m) == before


def test_fork_shares_blocks_and_append_copies_the_shared_partial_block():
    m = KVCacheManager(10, BS, kv=make_kv(10))
    m.allocate_slots("p", BS + 2, tokens(BS + 2))
    m.fork("p", "c")
    full, partial = m.block_table("p")
    assert m.block_table("c") == [full, partial]
    assert m.block_pool.blocks[partial].ref_cnt == 2
    parent_bytes = blocks_bytes(m, "p")
    pairs = m.allocate_slots("c", 1, [5])
    new = m.block_table("c")[1]
    assert pairs == [(partial, new)] and new not in (full, partial)
    m.apply_copies(pairs)
    for pool, before in zip(m.kv.pools, parent_bytes):
        np.testing.assert_array_equal(pool[new], before[1])
    assert m.allocate_slots("p", 1, [6]) == []  # the parent now holds its block alone
    assert m.block_table("p") == [full, partial]
    assert m.metrics().cow_copies == 1


def test_appending_after_a_full_shared_block_copies_nothing():
    m = KVCacheManager(10, BS)
    m.allocate_slots("p", BS, tokens(BS))
    m.fork("p", "c")
    assert m.allocate_slots("c", 1, [1]) == [] and m.allocate_slots("p", 1, [2]) == []
    assert m.block_table("c")[0] == m.block_table("p")[0]
    assert m.block_table("c")[1] != m.block_table("p")[1]


def test_prefix_cache_reuses_full_blocks_but_computes_the_last_token():
    m = KVCacheManager(20, BS)
    prompt = tokens(3 * BS)
    m.allocate_slots("a", len(prompt), prompt)
    m.allocate_slots("b", len(prompt), prompt)
    a, b = m.block_table("a"), m.block_table("b")
    assert b[:2] == a[:2] and b[2] != a[2]
    assert m.num_cached_tokens("b") == 2 * BS
    metrics = m.metrics()
    assert (metrics.prefix_queries, metrics.prefix_hits) == (4, 2)
    assert metrics.prefix_hit_rate == 0.5


def test_freed_prefix_stays_findable_and_extra_keys_separate_caches():
    m = KVCacheManager(20, BS)
    prompt = tokens(2 * BS + 1)
    m.allocate_slots("a", len(prompt), prompt)
    cached = m.block_table("a")[:2]
    m.free("a")
    assert m.metrics().blocks_cached == 2
    m.allocate_slots("other-model", len(prompt), prompt, extra_keys=("m2",))
    assert m.num_cached_tokens("other-model") == 0
    m.allocate_slots("b", len(prompt), prompt)
    assert m.block_table("b")[:2] == cached and m.num_cached_tokens("b") == 2 * BS


def test_hits_on_free_blocks_count_against_the_free_list():
    m = KVCacheManager(4, BS, watermark=0.0)  # 3 usable
    prompt = tokens(2 * BS + 1)
    m.allocate_slots("a", len(prompt), prompt)
    m.free("a")
    assert m.can_allocate("b", len(prompt), prompt)
    assert m.allocate_slots("b", len(prompt), prompt) == []
    assert m.num_cached_tokens("b") == 2 * BS and m.block_pool.num_free == 0


def test_pressure_evicts_cached_blocks_least_recently_freed_first():
    m = KVCacheManager(5, BS, watermark=0.0)
    m.allocate_slots("a", BS + 1, tokens(BS + 1, 0))
    m.allocate_slots("b", BS + 1, tokens(BS + 1, 50))
    m.free("a")
    m.free("b")
    m.allocate_slots("c", 2 * BS)  # takes a's two blocks, the least recently freed
    assert m.metrics().evictions == 1 and m.metrics().blocks_cached == 1
    m.allocate_slots("b2", BS + 1, tokens(BS + 1, 50))
    assert m.num_cached_tokens("b2") == BS


def test_disabled_prefix_caching_never_hits():
    m = KVCacheManager(20, BS, enable_prefix_caching=False)
    prompt = tokens(3 * BS)
    m.allocate_slots("a", len(prompt), prompt)
    m.allocate_slots("b", len(prompt), prompt)
    assert not set(m.block_table("a")) & set(m.block_table("b"))
    assert m.metrics().blocks_cached == 0


def test_swap_out_and_in_restore_the_bytes_exactly():
    m = KVCacheManager(12, BS, num_host_blocks=4, kv=make_kv(12, seed=3))
    m.allocate_slots("a", 3 * BS - 1, tokens(3 * BS - 1))
    before = blocks_bytes(m, "a")
    m.swap_out("a")
    assert m.status("a") is SeqStatus.SWAPPED and m.block_pool.num_free == 11
    m.allocate_slots("filler", 3 * BS)  # the old blocks get reused and overwritten
    for pool in m.kv.pools:
        pool[m.block_table("filler")] = -1.0
    m.swap_in("a")
    assert m.status("a") is SeqStatus.RUNNING and m.host_pool.num_free == 4
    for got, expected in zip(blocks_bytes(m, "a"), before):
        np.testing.assert_array_equal(got, expected)
    assert (m.metrics().swaps_out, m.metrics().swaps_in) == (1, 1)


def test_swap_errors_and_capacity():
    m = KVCacheManager(12, BS, num_host_blocks=2, watermark=0.0)
    m.allocate_slots("big", 3 * BS)
    m.allocate_slots("small", BS)
    assert not m.can_swap_out("big")
    before = snapshot(m)
    with pytest.raises(OutOfBlocksError, match="host blocks"):
        m.swap_out("big")
    assert snapshot(m) == before
    m.swap_out("small")
    with pytest.raises(SequenceError, match="swap_in first"):
        m.allocate_slots("small", 1)
    with pytest.raises(SequenceError, match="swapped"):
        m.swap_out("small")
    m.allocate_slots("hog", 8 * BS)
    assert not m.can_swap_in("small")
    with pytest.raises(OutOfBlocksError, match="swap_in"):
        m.swap_in("small")
    m.free("small")
    assert m.host_pool.num_free == 2


def test_recompute_frees_blocks_and_re_prefills_through_the_prefix_cache():
    m = KVCacheManager(12, BS, policy=PreemptionPolicy(mode="recompute"))
    prompt = tokens(2 * BS + 1)
    m.allocate_slots("a", len(prompt), prompt)
    m.allocate_slots("a", 1, [7])
    assert m.preempt("a") == "recompute"
    assert m.status("a") is SeqStatus.RECOMPUTE and m.block_pool.num_free == 11
    assert m.recompute_tokens("a") == prompt + [7]
    with pytest.raises(SequenceError, match="re-prefill"):
        m.slot_mapping("a", 1)
    assert m.allocate_slots("a", len(prompt) + 1) == []
    assert m.status("a") is SeqStatus.RUNNING and m.num_tokens("a") == len(prompt) + 1
    assert m.num_cached_tokens("a") == 2 * BS and m.metrics().recomputes == 1


def test_recompute_needs_token_ids():
    m = KVCacheManager(12, BS, num_host_blocks=4)
    m.allocate_slots("a", 5)
    with pytest.raises(SequenceError, match="token ids are unknown"):
        m.preempt("a", mode="recompute")
    assert m.preempt("a") == "swap"


@pytest.mark.parametrize(
    "block_bytes, host_blocks, expected",
    [(1 << 10, 8, "swap"), (1 << 30, 8, "recompute"), (1 << 10, 0, "recompute")],
)
def test_policy_picks_the_cheaper_preemption(block_bytes, host_blocks, expected):
    m = KVCacheManager(12, BS, num_host_blocks=host_blocks, block_bytes=block_bytes)
    m.allocate_slots("a", 2 * BS, tokens(2 * BS))
    assert m.preempt("a") == expected


def test_policy_and_config_are_checked():
    with pytest.raises(ConfigError, match="mode='drop'"):
        PreemptionPolicy(mode="drop")
    with pytest.raises(ConfigError, match="host_bytes_per_s"):
        PreemptionPolicy(host_bytes_per_s=0)
    with pytest.raises(ConfigError, match="block_size"):
        KVCacheManager(10, 0)
    with pytest.raises(ConfigError, match="watermark"):
        KVCacheManager(10, BS, watermark=1.0)
    with pytest.raises(ConfigError, match="num_host_blocks"):
        KVCacheManager(10, BS, num_host_blocks=-1)
    with pytest.raises(ShapeError, match="pools\\[0\\].shape"):
        KVCacheManager(11, BS, kv=make_kv(10))


def test_metrics_report_utilization_and_fragmentation():
    m = KVCacheManager(20, BS)
    m.allocate_slots("a", 2 * BS + 1, tokens(2 * BS + 1))
    m.fork("a", "b")
    metrics = m.metrics()
    assert metrics.blocks_used == 3 and metrics.blocks_free == 16
    assert metrics.live_slots == 2 * BS + 1 and metrics.allocated_slots == 3 * BS
    assert metrics.utilization == pytest.approx((2 * BS + 1) / (3 * BS))
    assert metrics.internal_fragmentation == pytest.approx(1 - metrics.utilization)
    assert metrics.as_dict()["blocks_cached"] == 2
