"""Float64 NumPy references for every pgen kernel, gathering K/V through the block table.

Used by `pgen check` (the quick start's main job) and by the tests; there is no other reference.
Decode and extend live in `pgen_runtime.reference` (tuning checks each candidate against them on
hosts without pgen) and are re-exported here.
"""

from __future__ import annotations

import numpy as np

from pgen_runtime.reference import attend, decode, extend, gather_kv, int8_queries, weight_rounding_allowance  # noqa: F401  # re-exported
from pgen_runtime import kv_quant
from pgen_runtime.kernel_table import KERNEL_NAMES
from pgen_runtime.spec import NULL_BLOCK_ID, AttentionSpec


def cache_write(spec: AttentionSpec, k, v, pool, slot_mapping):
    """The pool after writing k, v [T, Hkv, D] to their slots (quantized with kv_quant where the
    pool is)."""
    pool = pool.copy()
    bs = spec.block_size
    scales = kv_quant.pool_scales(spec, pool) if spec.kv_quantized else None
    codes = kv_quant.pool_codes(spec, pool) if spec.kv_quantized else None
    for t, slot in enumerate(slot_mapping):
        if slot < 0:
            continue
        for c, rows in enumerate((k[t], v[t])):
            if scales is None:
                pool[slot // bs, c, :, slot % bs] = rows
            else:
                codes[slot // bs, c, :, slot % bs], scales[slot // bs, c, :, slot % bs] = kv_quant.quantize_rows(spec, rows)
    if scales is not None:
        kv_quant.set_pool_codes(spec, pool, codes)
        kv_quant.set_pool_scales(spec, pool, scales)
    return pool


def copy_blocks(pool, pairs):
    pool = pool.copy()
    for src, dst in pairs:
        pool[dst] = pool[src]
    return pool


# ---- random paged cases: inputs for all six kernels, their expected results, one runner -----------
# NOTE: a case is a dict of numpy arrays (np.savez writes it), so a process without pgen (the
# footprint venv) runs the kernels on exactly the inputs whose reference the test computed.


def paged_case(spec: AttentionSpec, seq_lens, new_tokens=None, seed: int = 0, spare_blocks: int = 6) -> dict:
    """Random inputs for every kernel, with K/V scattered over randomly placed blocks.

    Every pool slot no sequence uses holds NaN: slots past a sequence's length in its last block,
    whole unused blocks and the null block. Tables are padded with the null block id and have one
    column more than the longest sequence needs.

    Args:
        seq_lens: cached tokens per sequence (decode and extend both attend to these).
        new_tokens: extend's new tokens per sequence (default 1 each); the last of each sequence's
            cached tokens.
        spare_blocks: unused blocks, the destinations of cache_write, copy_blocks and swap_in.
    """
    rng = np.random.default_rng(seed)
    hq, hkv, d, bs = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.block_size
    lens = np.asarray(seq_lens, np.int32)
    new = np.ones_like(lens) if new_tokens is None else np.asarray(new_tokens, np.int32)
    need = -(-lens // bs)
    num_blocks = 1 + int(need.sum()) + spare_blocks
    ids = rng.permutation(np.arange(1, num_blocks, dtype=np.int32))
    used, spare = ids[: need.sum()], ids[need.sum():]
    tables = np.full((len(lens), int(need.max()) + 1), NULL_BLOCK_ID, np.int32)
    pool = np.full((num_blocks, 2, hkv, bs, d), np.nan, np.float32 if spec.kv_quantized else spec.kv_dtype)
    for b, (start, length) in enumerate(zip(np.cumsum(need) - need, lens)):
        tables[b, : need[b]] = used[start : start + need[b]]
        pos = np.arange(length)
        pool[tables[b, pos // bs], :, :, pos % bs, :] = rng.standard_normal((length, 2, hkv, d))
    if spec.kv_quantized:  # NaN poison becomes NaN scales
        pool = kv_quant.quantize_pool(spec, pool)
    spare_slots = (spare[:, None] * bs + np.arange(bs)).reshape(-1)
    slots = rng.choice(spare_slots, size=min(7, len(spare_slots)), replace=False).astype(np.int32)
    slots[len(slots) // 2] = -1  # skipped
    moved = min(3, len(spare), len(used))
    return {
        "pool": pool,
        "block_tables": tables,
        "seq_lens": lens,
        "q_decode": rng.standard_normal((len(lens), hq, d)).astype(spec.dtype),
        "q_indptr": np.concatenate([[0], np.cumsum(new)]).astype(np.int32),
        "q_extend": rng.standard_normal((int(new.sum()), hq, d)).astype(spec.dtype),
        "k": rng.standard_normal((len(slots), hkv, d)).astype(spec.dtype),
        "v": rng.standard_normal((len(slots), hkv, d)).astype(spec.dtype),
        "slot_mapping": slots,
        "pairs": np.stack([rng.choice(used, moved, replace=False), spare[:moved]], axis=1).astype(np.int32),
        "swap_ids": rng.choice(used, moved, replace=False).astype(np.int32),
    }


def expected(spec: AttentionSpec, case: dict) -> dict:
    """What `run_kernels` must return for `case`, per kernel of the kernel table: float64
    attention, exact bytes for the rest; and per attention kernel `NAME_allowance`, the error its
    rounding of P·V's weights may add (`weight_rounding_allowance`)."""
    pool, ids = case["pool"], case["swap_ids"]
    results = {
        "decode": lambda: decode(spec, case["q_decode"], pool, case["block_tables"], case["seq_lens"]),
        "extend": lambda: extend(spec, case["q_extend"], pool, case["block_tables"], case["q_indptr"], case["seq_lens"]),
        "cache_write": lambda: cache_write(spec, case["k"], case["v"], pool, case["slot_mapping"]),
        "copy_blocks": lambda: copy_blocks(pool, case["pairs"]),
        "swap_out": lambda: pool[ids],
        "swap_in": lambda: pool,
    }
    want = {name: results[name]() for name in KERNEL_NAMES}
    # What an int8 cache's u8 P·V weights may add beyond the dtype's tolerance (zeros otherwise).
    want["decode_allowance"] = weight_rounding_allowance(spec, case["q_decode"], pool, case["block_tables"], case["seq_lens"])
    want["extend_allowance"] = weight_rounding_allowance(spec, case["q_extend"], pool, case["block_tables"],
                                                         case["seq_lens"], case["q_indptr"])
    return want
