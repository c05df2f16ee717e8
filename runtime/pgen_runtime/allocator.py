"""`BlockAllocator`: block tables of sequences, grown on demand, shared by fork and prefix hits.

It is the part of `KVCacheManager` that only moves block ids: the manager adds the device and host
bytes (copies, swaps), preemption, the kernel-facing arrays and metrics.

NOTE: invariants kept after every public call (tests/runtime/test_kv_stateful.py checks them):
  - every usable block is free xor referenced, and its refcount equals the number of running
    sequences whose block table holds it;
  - a block with refcount > 1 is never written: appending into a shared, partly filled last block
    first moves the appender to a fresh block and returns the (src, dst) copy for the caller to run;
  - a call that raises, or returns None, leaves every table, refcount and counter as it was.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence as Seq
from typing import NamedTuple

from .block_pool import Block, BlockPool
from .errors import ConfigError, OutOfBlocksError, SequenceError, ShapeError
from .prefix_cache import extend_block_hashes, hash_block_tokens
from .sequence import Sequence, SeqStatus

# Freed ids are remembered (to reject a second free or an append) up to this many, oldest first.
_FINISHED_MEMORY = 1 << 16


class _Plan(NamedTuple):
    """What an allocation would do, computed without changing any state.

    A tuple rather than a frozen dataclass: one is made per sequence per step, and costs a third.
    """

    fresh: bool  # creates (or re-prefills) the sequence: prefix lookup and watermark apply
    token_ids: Seq[int] | None
    extra_keys: tuple[Hashable, ...]
    hits: list[Block]
    num_new_blocks: int
    cow: bool
    cost: int  # blocks it takes from the free list


class BlockAllocator:
    """Sequences' block tables over one `BlockPool` (see `KVCacheManager` for the arguments)."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool, watermark: float
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size={block_size!r} must be a positive integer (e.g. 16)")
        if not 0.0 <= watermark < 1.0:
            raise ConfigError(f"watermark={watermark!r} must be in [0, 1) (e.g. 0.01)")
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * self.block_pool.num_usable)
        self._seqs: dict[Hashable, Sequence] = {}
        self._finished: OrderedDict[Hashable, None] = OrderedDict()
        self._counts = dict.fromkeys(
            ("prefix_queries", "prefix_hits", "cow_copies", "swaps_out", "swaps_in", "recomputes"), 0
        )

    def can_allocate(
        self,
        seq_id: Hashable,
        num_new_tokens: int,
        token_ids: Seq[int] | None = None,
        extra_keys: tuple[Hashable, ...] = (),
    ) -> bool:
        """Whether `allocate_slots` with the same arguments would return copies, not None.

        Without `token_ids` a new sequence's prefix hits are not counted, so the answer is safe
        but may be False where the allocation with them would fit.

        Raises:
            the errors `allocate_slots` raises for invalid requests.
        """
        return self._fits(self._plan(seq_id, num_new_tokens, token_ids, extra_keys))

    def allocate_slots(
        self,
        seq_id: Hashable,
        num_new_tokens: int,
        token_ids: Seq[int] | None = None,
        extra_keys: tuple[Hashable, ...] = (),
    ) -> list[tuple[int, int]] | None:
        """Reserve KV slots for `num_new_tokens` more tokens of a sequence.

        The first call for an unknown id creates the sequence and reuses the longest cached
        prefix of `token_ids` (see `num_cached_tokens`); a call on a sequence preempted by
        recompute re-prefills it (`token_ids` defaults to `recompute_tokens(seq_id)`).

        Args:
            seq_id: any hashable id.
            num_new_tokens: tokens to append (prompt chunk, or 1 per decode step).
            token_ids: their ids; without them the sequence is neither cached nor recomputable.
            extra_keys: prefix-cache keys beside the tokens (model, adapter); set at creation.

        Returns:
            (src, dst) block copies to run before attention (see `apply_copies`), or None when
            the pool is too full now: preempt a sequence and try again. State is unchanged on None.

        Raises:
            SequenceError: the sequence was freed, is swapped out, or `extra_keys` differ.
            ShapeError: `num_new_tokens` is negative or `token_ids` has another length.
            OutOfBlocksError: the sequence would need more blocks than the whole pool holds.
        """
        seq = self._seqs.get(seq_id)
        if (num_new_tokens == 1 and seq is not None and seq.status is SeqStatus.RUNNING and not extra_keys
                and 0 < seq.num_tokens % self.block_size < self.block_size - 1 and seq.blocks[-1].ref_cnt == 1
                and (token_ids is None or len(token_ids) == 1)):
            # NOTE: the decode step's common case, kept off the general path: the token lands in
            # the sequence's own last block and does not fill it, so nothing is allocated, copied
            # or cached. Same effect as _grow with an empty plan.
            seq.num_tokens += 1
            if seq.token_ids is not None:
                if token_ids is None:
                    seq.token_ids = None
                else:
                    seq.token_ids.append(token_ids[0])
            return []
        plan = self._plan(seq_id, num_new_tokens, token_ids, extra_keys)
        if not self._fits(plan):
            return None
        if plan.fresh:
            self._start(seq_id, plan, num_new_tokens)
            return []
        return self._grow(self._seqs[seq_id], plan, num_new_tokens)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make `child_id` share every block of `parent_id` (parallel sampling, beam search).

        Raises:
            SequenceError: the parent is unknown or not running, or the child id is taken.
        """
        parent = self._get(parent_id, "fork", SeqStatus.RUNNING)
        if child_id in self._seqs or child_id in self._finished:
            raise SequenceError(
                f"fork: child_id={child_id!r} already exists or was freed; pick an unused id"
            )
        for block in parent.blocks:
            self.block_pool.touch(block)
        self._seqs[child_id] = parent.child(child_id)

    def forget_cached(self, seq_id: Hashable) -> None:
        """Drop the prefix-cache entries of a sequence's blocks, whose KV a failed step may have
        left unwritten: no later prompt may find them (the blocks stay in its table)."""
        for block in self._get(seq_id, "forget_cached").blocks:
            self.block_pool.forget(block)

    def free(self, seq_id: Hashable) -> None:
        """Release a finished sequence's device blocks; its id cannot be used again.

        Raises:
            SequenceError: the sequence is unknown or was already freed.
        """
        seq = self._get(seq_id, "free")
        self.block_pool.free(seq.blocks[::-1])
        del self._seqs[seq_id]
        self._finished[seq_id] = None
        if len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def status(self, seq_id: Hashable) -> SeqStatus:
        return self._get(seq_id, "status").status

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._get(seq_id, "num_tokens").num_tokens

    def num_cached_tokens(self, seq_id: Hashable) -> int:
        """Leading tokens whose KV came from the prefix cache: the prefill may skip them."""
        return self._get(seq_id, "num_cached_tokens").num_cached_tokens

    def _get(self, seq_id: Hashable, op: str, status: SeqStatus | None = None) -> Sequence:
        seq = self._seqs.get(seq_id)
        if seq is None:
            why = "was already freed" if seq_id in self._finished else "does not exist"
            raise SequenceError(f"{op}: sequence {seq_id!r} {why}; use an id given to allocate_slots")
        if status is not None and seq.status is not status:
            fix = {
                SeqStatus.SWAPPED: "swap_in first",
                SeqStatus.RECOMPUTE: "re-prefill it with allocate_slots",
            }
            raise SequenceError(
                f"{op}: sequence {seq_id!r} is {seq.status.value}, not {status.value}; "
                f"{fix.get(seq.status, 'preempt it first')}"
            )
        return seq

    def _plan(
        self, seq_id: Hashable, num_new_tokens: int, token_ids: Seq[int] | None, extra_keys: tuple
    ) -> _Plan:
        seq = self._check_request(seq_id, num_new_tokens, token_ids, extra_keys)
        fresh = seq is None or seq.status is SeqStatus.RECOMPUTE
        if fresh and seq is not None:
            token_ids = seq.token_ids if token_ids is None else token_ids
            extra_keys = seq.extra_keys
        total = -(-((0 if fresh else seq.num_tokens) + num_new_tokens) // self.block_size)
        # Admission also keeps the watermark free, so a longer prompt could never be admitted.
        limit = self.block_pool.num_usable - (self.watermark_blocks if fresh else 0)
        if total > limit:
            raise OutOfBlocksError(
                f"sequence {seq_id!r} would need {total} blocks of {self.block_size} tokens but the "
                f"pool holds {limit} (watermark {self.watermark_blocks if fresh else 0} excluded); "
                "raise num_blocks or cap the length"
            )
        keys = tuple(extra_keys)
        if fresh:
            hits = self._cached_prefix(token_ids, keys)
            cost = total - sum(b.ref_cnt > 0 for b in hits)
            return _Plan(True, token_ids, keys, hits, total - len(hits), False, cost)
        last_shared = seq.num_tokens % self.block_size != 0 and seq.blocks[-1].ref_cnt > 1
        cow = num_new_tokens > 0 and last_shared
        new = total - len(seq.blocks) + cow
        return _Plan(False, token_ids, keys, [], new, cow, new)

    def _check_request(
        self, seq_id: Hashable, num_new_tokens: int, token_ids: Seq[int] | None, extra_keys: tuple
    ) -> Sequence | None:
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int) or num_new_tokens < 0:
            raise ShapeError(f"num_new_tokens={num_new_tokens!r} must be an integer >= 0")
        if token_ids is not None and len(token_ids) != num_new_tokens:
            raise ShapeError(
                f"token_ids has {len(token_ids)} ids but num_new_tokens={num_new_tokens}; "
                "pass one id per new token"
            )
        seq = self._seqs.get(seq_id)
        if seq is None and seq_id in self._finished:
            self._get(seq_id, "allocate_slots")
        if seq is not None and seq.status is SeqStatus.SWAPPED:
            self._get(seq_id, "allocate_slots", SeqStatus.RUNNING)
        if seq is not None and extra_keys and tuple(extra_keys) != seq.extra_keys:
            raise SequenceError(
                f"allocate_slots: extra_keys={extra_keys!r} but sequence {seq_id!r} was created with "
                f"{seq.extra_keys!r}; extra keys are fixed at creation"
            )
        return seq

    def _fits(self, plan: _Plan) -> bool:
        reserve = self.watermark_blocks if plan.fresh else 0
        return plan.cost + reserve <= self.block_pool.num_free

    def _cached_prefix(self, token_ids: Seq[int] | None, extra_keys: tuple) -> list[Block]:
        """Blocks holding the longest cached prefix; the last token is always left to compute."""
        if not self.enable_prefix_caching or token_ids is None:
            return []
        hits, parent = [], None
        for start in range(0, len(token_ids) - self.block_size, self.block_size):
            parent = hash_block_tokens(parent, token_ids[start : start + self.block_size], extra_keys)
            block = self.block_pool.lookup(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def _start(self, seq_id: Hashable, plan: _Plan, num_new_tokens: int) -> None:
        for block in plan.hits:  # NOTE: before allocate(), which could evict a free hit block
            self.block_pool.touch(block)
        blocks = plan.hits + self.block_pool.allocate(plan.num_new_blocks)
        tokens = None if plan.token_ids is None else list(plan.token_ids)
        seq = Sequence(seq_id, plan.extra_keys, blocks, num_new_tokens, tokens)
        seq.num_cached_tokens = len(plan.hits) * self.block_size
        self._seqs[seq_id] = seq
        if self.enable_prefix_caching and tokens is not None:
            self._counts["prefix_queries"] += max(0, (len(tokens) - 1) // self.block_size)
            self._counts["prefix_hits"] += len(plan.hits)
        self._cache_full_blocks(seq, 0)

    def _grow(self, seq: Sequence, plan: _Plan, num_new_tokens: int) -> list[tuple[int, int]]:
        new = self.block_pool.allocate(plan.num_new_blocks)
        pairs = []
        if plan.cow:
            old, seq.blocks[-1] = seq.blocks[-1], new.pop()
            self.block_pool.free([old])
            pairs.append((old.block_id, seq.blocks[-1].block_id))
            self._counts["cow_copies"] += 1
        seq.blocks.extend(new)
        seq.num_tokens += num_new_tokens
        if seq.token_ids is not None and plan.token_ids is not None:
            seq.token_ids.extend(plan.token_ids)
        elif num_new_tokens:
            seq.token_ids = None
        self._cache_full_blocks(seq, len(seq.block_hashes))
        return pairs

    def _cache_full_blocks(self, seq: Sequence, start: int) -> None:
        if not self.enable_prefix_caching or seq.token_ids is None:
            return
        extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, seq.extra_keys)
        for block, block_hash in zip(seq.blocks[start:], seq.block_hashes[start:]):
            if block.block_hash is None:
                self.block_pool.cache(block, block_hash)
