"""Float64 NumPy references of decode and extend, gathering K/V through the block table.

The compiler's tests and `pgen check` use them (through pgen.reference), and so does the runtime's
tuning measurement, which rejects a candidate whose output disagrees (`measure.check_output`).
"""

from __future__ import annotations

import numpy as np

from .kv_quant import dequantize_pool
from .spec import AttentionSpec


def gather_kv(pool: np.ndarray, table: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V of one sequence as float64 [length, Hkv, D], read through its block table."""
    bs = pool.shape[3]
    pos = np.arange(length)
    blocks = table[pos // bs]
    k = pool[blocks, 0, :, pos % bs, :].astype(np.float64)
    v = pool[blocks, 1, :, pos % bs, :].astype(np.float64)
    return k, v


def attend(spec: AttentionSpec, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Causal attention of query rows q [n, Hq, D] at `positions` over keys k, v [L, Hkv, D]."""
    g = spec.group_size
    kk = np.repeat(k, g, axis=1)  # [L, Hq, D]
    vv = np.repeat(v, g, axis=1)
    logits = np.einsum("nhd,lhd->hnl", q.astype(np.float64), kk) * spec.scale
    if spec.logit_softcap is not None:
        logits = spec.logit_softcap * np.tanh(logits / spec.logit_softcap)
    keys = np.arange(k.shape[0])
    visible = keys[None, :] <= positions[:, None]
    if spec.sliding_window is not None:
        visible &= keys[None, :] > positions[:, None] - spec.sliding_window
    logits = np.where(visible[None], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hnl,lhd->nhd", p, vv)


def values(spec: AttentionSpec, pool: np.ndarray) -> np.ndarray:
    """The pool's K/V values [NB, 2, Hkv, block_size, D]: the pool itself, or its dequantized codes."""
    return dequantize_pool(spec, pool) if spec.kv_quantized else pool


def decode(spec, q, pool, tables, seq_lens):
    pool = values(spec, pool)
    out = np.empty(q.shape, np.float64)
    for b, length in enumerate(seq_lens):
        k, v = gather_kv(pool, tables[b], int(length))
        out[b] = attend(spec, q[b : b + 1], k, v, np.array([length - 1]))[0]
    return out


def extend(spec, q, pool, tables, q_indptr, seq_lens):
    pool = values(spec, pool)
    out = np.empty(q.shape, np.float64)
    for b, length in enumerate(seq_lens):
        lo, hi = int(q_indptr[b]), int(q_indptr[b + 1])
        k, v = gather_kv(pool, tables[b], int(length))
        positions = np.arange(length - (hi - lo), length)
        out[lo:hi] = attend(spec, q[lo:hi], k, v, positions)
    return out
