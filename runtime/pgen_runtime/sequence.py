"""Per-sequence records of the KV cache manager and the snapshot of its metrics."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from .block_pool import Block
from .prefix_cache import BlockHash


class SeqStatus(enum.Enum):
    """Where a sequence's KV lives."""

    RUNNING = "running"  # in device blocks; may grow
    SWAPPED = "swapped"  # in host blocks; swap_in before it runs again
    RECOMPUTE = "recompute"  # nowhere; the next allocate_slots re-prefills its tokens


@dataclass(slots=True, eq=False)
class Sequence:
    """One sequence: its block table, its length and what prefix caching needs to know.

    `token_ids` is None once a call appended tokens without giving their ids: from then on the
    sequence's blocks are not cached and it cannot be recomputed, only swapped.
    """

    seq_id: Hashable
    extra_keys: tuple[Hashable, ...] = ()
    blocks: list[Block] = field(default_factory=list)
    num_tokens: int = 0
    token_ids: list[int] | None = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    status: SeqStatus = SeqStatus.RUNNING
    host_block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    def child(self, child_id: Hashable) -> Sequence:
        """A fork: same tokens and keys, sharing (not copying) the block list's entries."""
        tokens = None if self.token_ids is None else list(self.token_ids)
        return Sequence(
            child_id,
            self.extra_keys,
            list(self.blocks),
            self.num_tokens,
            tokens,
            list(self.block_hashes),
            num_cached_tokens=self.num_cached_tokens,
        )


@dataclass(frozen=True, slots=True)
class KVMetrics:
    """A snapshot of the KV cache: occupancy, waste, sharing and preemption counters.

    Slots are token positions; a shared block counts once, filled as far as its fullest holder.
    """

    num_blocks: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    live_slots: int
    allocated_slots: int
    host_blocks_used: int
    prefix_queries: int
    prefix_hits: int
    cow_copies: int
    swaps_out: int
    swaps_in: int
    recomputes: int
    evictions: int

    @property
    def utilization(self) -> float:
        """Live token slots / allocated token slots (1.0 when nothing is allocated)."""
        return self.live_slots / self.allocated_slots if self.allocated_slots else 1.0

    @property
    def internal_fragmentation(self) -> float:
        """Share of allocated slots reserved but empty: the tails of partly filled blocks."""
        return 1.0 - self.utilization

    @property
    def prefix_hit_rate(self) -> float:
        """Cached full blocks found / full blocks looked up at sequence creation."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("utilization", "internal_fragmentation", "prefix_hit_rate"):
            data[name] = getattr(self, name)
        return data
