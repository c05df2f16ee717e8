"""`BlockPool`: KV blocks with refcounts, an O(1) LRU free list and the prefix-cache hash map.

NOTE: invariants the pool keeps after every public call:
  - block `NULL_BLOCK_ID` is never handed out, never freed, never cached;
  - a block is in the free list iff its refcount is 0 (free xor referenced);
  - the free list is in eviction order: the head is the least recently freed block. Freed blocks go
    to the tail, so a block that holds a cached prefix lives as long as possible;
  - `cached[h] is b` iff `b.block_hash == h`; such a block may be free (evictable) or in use. It
    leaves the map only when allocation takes it from the free list (LRU eviction) or on reset.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from .errors import ConfigError, OutOfBlocksError
from .spec import NULL_BLOCK_ID


@dataclass(slots=True, eq=False)
class Block:
    """One KV block: its id, how many block tables hold it, and the prefix hash it caches."""

    block_id: int
    ref_cnt: int = 0
    block_hash: Hashable | None = None
    # Intrusive links of the free list: None while the block is referenced.
    prev: Block | None = None
    next: Block | None = None


class FreeBlockQueue:
    """Doubly linked list of free blocks with head and tail sentinels: O(1) push, pop, remove."""

    def __init__(self, blocks: list[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> Block:
        block = self._head.next
        assert block is not self._tail, "popleft on an empty free list"
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        assert block.prev is not None and block.next is not None, "block is not in the free list"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_free -= 1

    def append(self, block: Block) -> None:
        last = self._tail.prev
        block.prev, block.next = last, self._tail
        last.next = self._tail.prev = block
        self.num_free += 1

    def __iter__(self):
        block = self._head.next
        while block is not self._tail:
            yield block
            block = block.next


class BlockPool:
    """All device blocks of one KV cache (every layer shares the same block ids).

    Args:
        num_blocks: blocks in the pool, including the reserved null block; at least 2.
    """

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 2:
            raise ConfigError(
                f"num_blocks={num_blocks!r} must be an integer >= 2 (block {NULL_BLOCK_ID} is "
                "reserved as the null block); give the pool more blocks"
            )
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue([b for b in self.blocks if b.block_id != NULL_BLOCK_ID])
        self.cached: dict[Hashable, Block] = {}
        self.num_evictions = 0
        self.num_refs = 0  # block-table references: the sum of every ref_cnt
        self.num_shared = 0  # blocks with ref_cnt > 1 (in more than one block table)

    @property
    def num_usable(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return len(self.blocks) - 1

    @property
    def num_free(self) -> int:
        """Blocks with refcount 0, cached or not: what allocation can take."""
        return self._free.num_free

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def allocate(self, n: int) -> list[Block]:
        """Take `n` blocks from the head of the free list (LRU), evicting their cached hashes.

        Raises:
            OutOfBlocksError: fewer than `n` blocks are free; nothing is taken.
        """
        if n > self.num_free:
            raise OutOfBlocksError(
                f"allocate(n={n}) but only {self.num_free} blocks are free; free or preempt "
                "sequences first (check with can_allocate)"
            )
        taken = [self._free.popleft() for _ in range(n)]
        for block in taken:
            self._evict_hash(block)
            block.ref_cnt = 1
        self.num_refs += n
        return taken

    def touch(self, block: Block) -> None:
        """Take one more reference to `block`; a free (cached) block leaves the free list."""
        if block.ref_cnt == 0:
            self._free.remove(block)
        elif block.ref_cnt == 1:
            self.num_shared += 1
        block.ref_cnt += 1
        self.num_refs += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference to each block; blocks reaching 0 join the tail of the free list.

        Callers pass a table's blocks in reverse so that a sequence's tail blocks, the least likely
        to be shared by a later prompt, are evicted before its head blocks.
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed more often than taken"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)
            elif block.ref_cnt == 1:
                self.num_shared -= 1
        self.num_refs -= len(blocks)

    def lookup(self, block_hash: Hashable) -> Block | None:
        """The block holding `block_hash`, free or in use, or None."""
        return self.cached.get(block_hash)

    def cache(self, block: Block, block_hash: Hashable) -> None:
        """Record that a full, referenced `block` holds the prefix `block_hash`.

        A second block with the same contents (two prompts computed at once) is not recorded: the
        first stays the one later prompts find.
        """
        assert block.ref_cnt > 0 and block.block_hash is None
        if block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def forget(self, block: Block) -> None:
        """Forget the prefix `block` holds, if it is the cached one (its contents are suspect)."""
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            self._evict_hash(block)

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash of a free block (e.g. after new weights); returns how many."""
        evicted = [b for b in self._free if b.block_hash is not None]
        for block in evicted:
            self._evict_hash(block)
        return len(evicted)

    def _evict_hash(self, block: Block) -> None:
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            block.block_hash = None
            self.num_evictions += 1
