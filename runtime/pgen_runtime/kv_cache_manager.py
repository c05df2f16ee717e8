"""`KVCacheManager`: the one facade the scheduler talks to about KV memory.

On top of `BlockAllocator` (block tables, fork, copy-on-write, prefix caching) it owns the bytes:
it runs copy-on-write copies and swaps through the kernels of its optional `kv` object, keeps
the host pool, preempts by swap or recompute, and builds the arrays the attention kernels read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Sequence as Seq
from typing import Any

import numpy as np

from .allocator import BlockAllocator
from .errors import ConfigError, OutOfBlocksError, SequenceError, ShapeError
from .kv_layout import block_table_rows, check_kv, slot_ids
from .preemption import SWAP, HostPool, PreemptionPolicy
from .sequence import KVMetrics, Sequence, SeqStatus


class KVCacheManager(BlockAllocator):
    """Paged KV memory: block tables, copy-on-write, prefix caching, swap and recompute.

    Args:
        num_blocks: device blocks per layer, including the reserved null block 0.
        block_size: tokens per block.
        num_host_blocks: host blocks for swapped-out sequences (0: preempt by recompute only).
        enable_prefix_caching: reuse full blocks of equal prefixes across sequences.
        watermark: share of blocks kept free when admitting a sequence, so that running sequences
            can still grow without being preempted at once.
        kv: optional device KV: `pools` (per-layer arrays [num_blocks, 2, Hkv, block_size, D]) and
            `kernels` (`copy_blocks`, `swap_out`, `swap_in`); without it only ids are managed.
        policy: how to preempt; defaults to the cheaper of swap and recompute by estimate.
        block_bytes: bytes of one block over all layers, for the policy when `kv` is not given
            (without either, swapping looks free and the policy swaps whenever the host has room).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        enable_prefix_caching: bool = True,
        watermark: float = 0.01,
        kv: Any | None = None,
        policy: PreemptionPolicy | None = None,
        block_bytes: int | None = None,
    ) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching, watermark)
        check_kv(kv, num_blocks, block_size)
        self.host_pool = HostPool(num_host_blocks, kv)
        self.kv = kv
        self.policy = policy or PreemptionPolicy()
        self.bytes_per_block = sum(p[0].nbytes for p in kv.pools) if kv is not None else block_bytes or 0

    def free(self, seq_id: Hashable) -> None:
        """Release a finished sequence's device or host blocks; its id cannot be used again.

        Raises:
            SequenceError: the sequence is unknown or was already freed.
        """
        self.host_pool.release(self._get(seq_id, "free").host_block_ids)
        super().free(seq_id)

    def apply_copies(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Run copy-on-write pairs from `allocate_slots` on every layer's pool (needs `kv`)."""
        pairs = np.asarray(list(pairs), dtype=np.int32).reshape(-1, 2)
        if len(pairs) == 0:
            return
        if self.kv is None:
            raise ConfigError("apply_copies: kv=None; pass kv= to KVCacheManager, or run the copies yourself")
        for pool in self.kv.pools:
            self.kv.kernels.copy_blocks(pool, pairs)

    def preempt(self, seq_id: Hashable, mode: str | None = None) -> str:
        """Take a running sequence off the device by swap or recompute; returns the mode used.

        Args:
            mode: "swap" or "recompute" to force one; None lets `policy` pick by estimated cost.

        Raises:
            SequenceError: not running, or recompute without known token ids.
            OutOfBlocksError: swap without enough free host blocks.
        """
        seq = self._get(seq_id, "preempt", SeqStatus.RUNNING)
        policy = self.policy if mode is None else dataclasses.replace(self.policy, mode=mode)
        chosen = policy.choose(
            seq.num_tokens,
            len(seq.blocks) * self.bytes_per_block,
            can_swap=self.can_swap_out(seq_id),
            can_recompute=seq.token_ids is not None,
        )
        if chosen == SWAP:
            self.swap_out(seq_id)
        else:
            self._recompute(seq)
        return chosen

    def can_swap_out(self, seq_id: Hashable) -> bool:
        return len(self._get(seq_id, "swap_out", SeqStatus.RUNNING).blocks) <= self.host_pool.num_free

    def swap_out(self, seq_id: Hashable) -> None:
        """Move a running sequence's blocks to the host pool through `kernels.swap_out`.

        Blocks it shares with other sequences are copied, not shared, on the host: after
        `swap_in` the sequence holds private blocks with the same bytes.

        Raises:
            SequenceError: the sequence is not running.
            OutOfBlocksError: fewer free host blocks than it holds (`can_swap_out`).
        """
        seq = self._get(seq_id, "swap_out", SeqStatus.RUNNING)
        seq.host_block_ids = self.host_pool.store(seq.block_ids)
        self.block_pool.free(seq.blocks[::-1])
        seq.blocks, seq.status = [], SeqStatus.SWAPPED
        self._counts["swaps_out"] += 1

    def can_swap_in(self, seq_id: Hashable) -> bool:
        seq = self._get(seq_id, "swap_in", SeqStatus.SWAPPED)
        return len(seq.host_block_ids) + self.watermark_blocks <= self.block_pool.num_free

    def swap_in(self, seq_id: Hashable) -> None:
        """Bring a swapped sequence back to fresh device blocks through `kernels.swap_in`.

        Raises:
            OutOfBlocksError: not enough free device blocks above the watermark (`can_swap_in`).
        """
        if not self.can_swap_in(seq_id):
            raise OutOfBlocksError(
                f"swap_in: sequence {seq_id!r} needs {len(self._seqs[seq_id].host_block_ids)} "
                f"blocks above a watermark of {self.watermark_blocks}, {self.block_pool.num_free} "
                "are free; free or preempt other sequences first"
            )
        seq = self._seqs[seq_id]
        seq.blocks = self.block_pool.allocate(len(seq.host_block_ids))
        self.host_pool.load(seq.host_block_ids, seq.block_ids)
        seq.host_block_ids, seq.status = [], SeqStatus.RUNNING
        self._cache_full_blocks(seq, 0)
        self._counts["swaps_in"] += 1

    def recompute_tokens(self, seq_id: Hashable) -> list[int]:
        """Prompt + generated token ids of a sequence, as a re-prefill after recompute needs them."""
        seq = self._get(seq_id, "recompute_tokens")
        if seq.token_ids is None:
            raise SequenceError(f"recompute_tokens: sequence {seq_id!r} was given no token_ids")
        return list(seq.token_ids)

    def block_table(self, seq_id: Hashable, width: int | None = None) -> list[int] | np.ndarray:
        """Block ids of a running sequence; with `width`, an int32 row padded with NULL_BLOCK_ID."""
        ids = self._get(seq_id, "block_table", SeqStatus.RUNNING).block_ids
        return ids if width is None else block_table_rows([ids], width)[0]

    def block_tables(self, seq_ids: Seq[Hashable], width: int | None = None) -> np.ndarray:
        """int32 [len(seq_ids), width] block tables padded with NULL_BLOCK_ID (width: the longest)."""
        return block_table_rows([self.block_table(s) for s in seq_ids], width)

    def slot_mapping(self, seq_id: Hashable, num_new_tokens: int) -> np.ndarray:
        """int32 slots (block * block_size + offset) of the last `num_new_tokens` positions."""
        return self.slot_mappings([seq_id], [num_new_tokens])

    def slot_mappings(self, seq_ids: Seq[Hashable], num_new_tokens: Seq[int]) -> np.ndarray:
        """The slot mappings of a step's sequences, concatenated in order, as one int32 array.

        Raises:
            ShapeError: the lists differ in length, or a count exceeds its sequence's length.
        """
        if len(seq_ids) != len(num_new_tokens):
            raise ShapeError(
                f"slot_mappings: {len(seq_ids)} seq_ids but {len(num_new_tokens)} num_new_tokens; "
                "pass one count per sequence"
            )
        slots: list[int] = []
        for seq_id, n in zip(seq_ids, num_new_tokens):
            seq = self._get(seq_id, "slot_mapping", SeqStatus.RUNNING)
            if not 0 <= n <= seq.num_tokens:
                raise ShapeError(
                    f"slot_mapping: num_new_tokens={n} but sequence {seq_id!r} holds "
                    f"{seq.num_tokens} tokens; call allocate_slots first"
                )
            slots += slot_ids(seq.blocks, seq.num_tokens - n, seq.num_tokens, self.block_size)
        return np.array(slots, dtype=np.int32)

    def metrics(self) -> KVMetrics:
        pool = self.block_pool
        return KVMetrics(
            num_blocks=pool.num_usable,
            blocks_used=pool.num_used,
            blocks_free=pool.num_free,
            blocks_cached=len(pool.cached),
            live_slots=self._live_slots(),
            allocated_slots=pool.num_used * self.block_size,
            host_blocks_used=self.host_pool.num_blocks - self.host_pool.num_free,
            evictions=pool.num_evictions,
            **self._counts,
        )

    def _live_slots(self) -> int:
        """Token slots holding KV, each shared block counted once: O(sequences), not O(blocks).

        Every referenced block is full except a sequence's blocks from `num_tokens // block_size` on
        (its partial last block and blocks allocated ahead); a block shared by several sequences
        holds as many slots as its fullest user has written.
        """
        bs = self.block_size
        missing: dict[int, int] = {}
        for seq in self._seqs.values():
            n = seq.num_tokens
            for i in range(n // bs, len(seq.blocks)):
                block_id = seq.blocks[i].block_id
                missing[block_id] = min(missing.get(block_id, bs), bs - max(0, n - i * bs))
        return self.block_pool.num_used * bs - sum(missing.values())

    def _recompute(self, seq: Sequence) -> None:
        if seq.token_ids is None:
            raise SequenceError(
                f"preempt: sequence {seq.seq_id!r} cannot be recomputed, its token ids are unknown; "
                "pass token_ids to allocate_slots or preempt by swap"
            )
        self.block_pool.free(seq.blocks[::-1])
        seq.blocks, seq.status = [], SeqStatus.RECOMPUTE
        self._counts["recomputes"] += 1
