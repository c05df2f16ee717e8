"""Chained block hashes for prefix caching: a full block is named by its whole prefix.

NOTE: a block's key is (hash of the parent key, this block's token ids, extra keys). The token ids
and extra keys are kept in the key itself, so two blocks only match when their own tokens and keys
are equal; the parent is matched by its 64-bit hash, as in vLLM v1. Extra keys separate caches
that must not be shared even for equal tokens: a model id, a LoRA adapter id, a cache salt.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple


class BlockHash(NamedTuple):
    """The prefix-cache key of one full block."""

    hash_value: int
    token_ids: tuple[int, ...]
    extra_keys: tuple[Hashable, ...]


def hash_block_tokens(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[Hashable, ...] = ()
) -> BlockHash:
    """The key of a full block whose prefix (every block before it) has key `parent`."""
    tokens = tuple(token_ids)
    parent_value = None if parent is None else parent.hash_value
    return BlockHash(hash((parent_value, tokens, extra_keys)), tokens, extra_keys)


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, extra_keys: tuple[Hashable, ...] = ()
) -> None:
    """Append to the chain `hashes` the keys of the full blocks of `token_ids` it lacks."""
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block_tokens(parent, token_ids[start : start + block_size], extra_keys))
