"""The arrays the kernels read from the manager: padded block tables, slot mappings, KV pools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .block_pool import Block
from .errors import ShapeError
from .spec import NULL_BLOCK_ID

KERNEL_NAMES = ("copy_blocks", "swap_out", "swap_in")


def block_table_rows(tables: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
    """int32 [len(tables), width] rows padded with NULL_BLOCK_ID; width defaults to the longest."""
    longest = max((len(t) for t in tables), default=0)
    width = max(longest, 1) if width is None else width
    if longest > width:
        raise ShapeError(
            f"width={width} but a block table holds {longest} blocks; pass width >= {longest} or None"
        )
    if not tables:
        return np.full((0, width), NULL_BLOCK_ID, dtype=np.int32)
    # One array call over padded lists: a numpy assignment per row costs more than the row.
    return np.array([[*table, *[NULL_BLOCK_ID] * (width - len(table))] for table in tables], dtype=np.int32)


def slot_ids(blocks: Sequence[Block], start: int, stop: int, block_size: int) -> list[int]:
    """KV slots (block * block_size + offset) of token positions start..stop-1.

    Plain Python: a decode step asks for one slot per sequence, where numpy's call overhead
    would cost more than the work.
    """
    return [blocks[p // block_size].block_id * block_size + p % block_size for p in range(start, stop)]


def check_kv(kv: Any | None, num_blocks: int, block_size: int) -> None:
    """Reject a `kv` object whose pools or kernels do not match the manager, naming the fix."""
    if kv is None:
        return
    missing = [n for n in KERNEL_NAMES if not callable(getattr(getattr(kv, "kernels", None), n, None))]
    if not hasattr(kv, "pools") or missing:
        raise ShapeError(
            f"kv={type(kv).__name__} needs `pools` (one array per layer) and `kernels` with "
            f"{', '.join(KERNEL_NAMES)}; missing: {', '.join(missing) or 'pools'}"
        )
    # A quantized pool's blocks hold scale rows after their block_size token rows.
    spec = getattr(kv.kernels, "spec", None)
    rows = spec.pool_rows if spec is not None else block_size
    for layer, pool in enumerate(kv.pools):
        shape = tuple(getattr(pool, "shape", ()))
        if len(shape) != 5 or shape[0] != num_blocks or shape[1] != 2 or shape[3] != rows:
            raise ShapeError(
                f"kv.pools[{layer}].shape={shape} but the layout is [num_blocks={num_blocks}, 2, "
                f"num_kv_heads, {'block_size' if rows == block_size else 'block_size + scale rows'}={rows}, "
                "head_dim]; allocate pools to match"
            )
