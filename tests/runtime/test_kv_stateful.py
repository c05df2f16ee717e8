"""Stateful test of `KVCacheManager`: random allocate / append / fork / free / swap / recompute /
eviction / prefix-hit interleavings, with the manager's invariants checked after every step.

The test writes each token's KV through `slot_mapping` as values derived from the token (K) and its
position (V), so a block that was written while shared, copied wrong, swapped back wrong or found
in the prefix cache after being reused shows up as a wrong value.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from device_kv import SPEC, make_kv

from pgen_runtime import NULL_BLOCK_ID, KVCacheManager, SequenceError, SeqStatus

BS = SPEC.block_size
NUM_BLOCKS = 24
NUM_HOST_BLOCKS = 8
# Prompts start with one of these, so that sequences share cached prefixes.
PREFIXES = [list(range(base, base + 3 * BS)) for base in (1000, 2000, 3000)]
pick = st.integers(0, 1 << 16)


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv = make_kv(NUM_BLOCKS, num_layers=1)
        self.m = KVCacheManager(NUM_BLOCKS, BS, num_host_blocks=NUM_HOST_BLOCKS, kv=self.kv, watermark=0.05)
        self.tokens: dict[int, list[int]] = {}  # what each live sequence must hold
        self.swapped: dict[int, list[np.ndarray]] = {}  # bytes of its blocks at swap_out
        self.next_id = 0

    # ---- helpers ---------------------------------------------------------------------------------

    def ids(self, status: SeqStatus) -> list[int]:
        return [s for s in self.m.seq_ids if self.m.status(s) is status]

    def choose(self, status: SeqStatus, index: int) -> int:
        ids = self.ids(status)
        return ids[index % len(ids)]

    def write(self, seq_id: int, start: int) -> None:
        """Write the KV of positions start.. of a running sequence, as a forward pass would."""
        slots = self.m.slot_mapping(seq_id, self.m.num_tokens(seq_id) - start)
        blocks, offsets = slots // BS, slots % BS
        assert all(self.m.block_pool.blocks[b].ref_cnt == 1 for b in blocks), "write into a shared block"
        values = np.asarray(self.tokens[seq_id][start:], dtype=np.float32)
        positions = np.arange(start, start + len(values), dtype=np.float32)
        for pool in self.kv.pools:
            pool[blocks, 0, :, offsets, :] = values[:, None, None]
            pool[blocks, 1, :, offsets, :] = positions[:, None, None]

    def allocate(self, seq_id: int, new_tokens: list[int] | None) -> bool:
        """allocate_slots; None must change nothing. Runs the copies and writes the new KV."""
        before = self.m.metrics()
        fresh = seq_id not in self.tokens or self.m.status(seq_id) is SeqStatus.RECOMPUTE
        n = len(self.tokens[seq_id]) if new_tokens is None else len(new_tokens)
        pairs = self.m.allocate_slots(seq_id, n, new_tokens)
        if pairs is None:
            assert self.m.metrics() == before
            return False
        assert all(self.m.block_pool.blocks[dst].ref_cnt == 1 for _, dst in pairs)
        self.m.apply_copies(pairs)
        if new_tokens is not None:
            self.tokens[seq_id] = ([] if fresh else self.tokens[seq_id]) + new_tokens
        start = self.m.num_cached_tokens(seq_id) if fresh else self.m.num_tokens(seq_id) - n
        self.write(seq_id, start)
        return True

    # ---- rules -----------------------------------------------------------------------------------

    @rule(
        prefix=st.integers(0, len(PREFIXES) - 1),
        shared=st.integers(0, 3 * BS),
        extra=st.integers(1, 2 * BS),
    )
    def new_sequence(self, prefix: int, shared: int, extra: int) -> None:
        seq_id, self.next_id = self.next_id, self.next_id + 1
        prompt = PREFIXES[prefix][:shared] + [seq_id * 100 + i for i in range(extra)]
        self.allocate(seq_id, prompt)

    @precondition(lambda self: self.ids(SeqStatus.RUNNING))
    @rule(index=pick, n=st.integers(1, BS + 2), token=st.integers(0, 999))
    def append(self, index: int, n: int, token: int) -> None:
        seq_id = self.choose(SeqStatus.RUNNING, index)
        if self.m.num_tokens(seq_id) + n <= 10 * BS:
            self.allocate(seq_id, [token + i for i in range(n)])

    @precondition(lambda self: self.ids(SeqStatus.RUNNING))
    @rule(index=pick)
    def fork(self, index: int) -> None:
        parent = self.choose(SeqStatus.RUNNING, index)
        child, self.next_id = self.next_id, self.next_id + 1
        self.m.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(index=pick)
    def free(self, index: int) -> None:
        seq_id = list(self.tokens)[index % len(self.tokens)]
        self.m.free(seq_id)
        del self.tokens[seq_id]
        self.swapped.pop(seq_id, None)
        before = self.m.metrics()
        try:
            self.m.free(seq_id)
            raise AssertionError("a second free must raise")
        except SequenceError:
            assert self.m.metrics() == before

    @precondition(lambda self: self.ids(SeqStatus.RUNNING))
    @rule(index=pick)
    def swap_out(self, index: int) -> None:
        seq_id = self.choose(SeqStatus.RUNNING, index)
        if self.m.can_swap_out(seq_id):
            table = self.m.block_table(seq_id)
            self.swapped[seq_id] = [pool[table].copy() for pool in self.kv.pools]
            self.m.swap_out(seq_id)

    @precondition(lambda self: self.ids(SeqStatus.SWAPPED))
    @rule(index=pick)
    def swap_in(self, index: int) -> None:
        seq_id = self.choose(SeqStatus.SWAPPED, index)
        if self.m.can_swap_in(seq_id):
            self.m.swap_in(seq_id)
            table = self.m.block_table(seq_id)
            for pool, saved in zip(self.kv.pools, self.swapped.pop(seq_id)):
                assert np.array_equal(pool[table], saved), "swap out + in changed bytes"

    @precondition(lambda self: self.ids(SeqStatus.RUNNING))
    @rule(index=pick, mode=st.sampled_from(["recompute", None]))
    def preempt(self, index: int, mode: str | None) -> None:
        seq_id = self.choose(SeqStatus.RUNNING, index)
        table = self.m.block_table(seq_id)
        saved = [pool[table].copy() for pool in self.kv.pools]
        if self.m.preempt(seq_id, mode) == "swap":
            self.swapped[seq_id] = saved

    @precondition(lambda self: self.ids(SeqStatus.RECOMPUTE))
    @rule(index=pick)
    def re_prefill(self, index: int) -> None:
        seq_id = self.choose(SeqStatus.RECOMPUTE, index)
        assert self.m.recompute_tokens(seq_id) == self.tokens[seq_id]
        self.allocate(seq_id, None)

    @rule(fraction=st.floats(0.5, 1.0))
    def pressure(self, fraction: float) -> None:
        """A token-less sequence takes most free blocks (evicting cached ones), scribbles, ends."""
        pool = self.m.block_pool
        n = min(int(pool.num_free * fraction), pool.num_usable - self.m.watermark_blocks) * BS
        seq_id, self.next_id = self.next_id, self.next_id + 1
        if n and self.m.allocate_slots(seq_id, n) is not None:
            for pool in self.kv.pools:
                pool[self.m.block_table(seq_id)] = -7.0
            self.m.free(seq_id)

    # ---- invariants ------------------------------------------------------------------------------

    @invariant()
    def blocks_are_free_xor_referenced_with_exact_refcounts(self) -> None:
        pool = self.m.block_pool
        holders = [0] * len(pool.blocks)
        for seq_id in self.ids(SeqStatus.RUNNING):
            for block_id in self.m.block_table(seq_id):
                holders[block_id] += 1
        free = {b.block_id for b in pool._free}
        assert NULL_BLOCK_ID not in free and holders[NULL_BLOCK_ID] == 0
        assert len(free) == pool.num_free
        for block in pool.blocks[1:]:
            assert block.ref_cnt == holders[block.block_id]
            assert (block.ref_cnt == 0) == (block.block_id in free)
        assert pool.num_refs == sum(holders)
        assert pool.num_shared == sum(h > 1 for h in holders)

    @invariant()
    def live_slots_count_each_written_slot_once(self) -> None:
        fill: dict[int, int] = {}  # the definition, block by block
        for seq_id in self.ids(SeqStatus.RUNNING):
            n = self.m.num_tokens(seq_id)
            for i, block_id in enumerate(self.m.block_table(seq_id)):
                fill[block_id] = max(fill.get(block_id, 0), min(BS, max(0, n - i * BS)))
        assert self.m.metrics().live_slots == sum(fill.values())

    @invariant()
    def every_sequence_reads_back_its_own_tokens(self) -> None:
        for seq_id in self.ids(SeqStatus.RUNNING):
            n = self.m.num_tokens(seq_id)
            assert len(self.tokens[seq_id]) == n
            slots = self.m.slot_mapping(seq_id, n)
            for pool in self.kv.pools:
                got = pool[slots // BS, :, 0, slots % BS, 0]
                assert np.array_equal(got[:, 0], self.tokens[seq_id]), "K of a token changed"
                assert np.array_equal(got[:, 1], np.arange(n)), "V of a token changed"

    @invariant()
    def cached_blocks_hold_their_tokens(self) -> None:
        for block_hash, block in self.m.block_pool.cached.items():
            assert block.block_hash == block_hash
            for pool in self.kv.pools:
                assert np.array_equal(pool[block.block_id, 0, 0, :, 0], block_hash.token_ids)

    @invariant()
    def host_blocks_are_accounted(self) -> None:
        host = [h for s in self.ids(SeqStatus.SWAPPED) for h in self.m._seqs[s].host_block_ids]
        assert len(set(host)) == len(host) == NUM_HOST_BLOCKS - self.m.host_pool.num_free

    def teardown(self) -> None:
        for seq_id in list(self.tokens):
            self.m.free(seq_id)
        assert self.m.seq_ids == []
        assert self.m.block_pool.num_free == self.m.block_pool.num_usable
        assert self.m.host_pool.num_free == NUM_HOST_BLOCKS


KVCacheMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestKVCacheManagerStateful = KVCacheMachine.TestCase
