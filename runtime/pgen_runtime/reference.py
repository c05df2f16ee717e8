"""Float64 NumPy references of decode and extend, gathering K/V through the block table.

The compiler's tests and `pgen check` use them (through pgen.reference), and so does the runtime's
tuning measurement, which rejects a candidate whose output disagrees (`measure.check_output`).
"""

from __future__ import annotations

import numpy as np

from .kv_quant import dequantize_pool
from .spec import AttentionSpec


def gather_kv(spec: AttentionSpec, pool: np.ndarray, table: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V of one sequence as float64 [length, Hkv, D], read through its block table (the
    values of its blocks only, where the pool is quantized: a tuning pool is hundreds of MiB)."""
    bs = spec.block_size
    pos = np.arange(length)
    blocks = table[pos // bs]
    if spec.kv_quantized:
        used, blocks = np.unique(blocks, return_inverse=True)
        pool = dequantize_pool(spec, pool[used])
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


def int8_queries(spec: AttentionSpec, q: np.ndarray) -> np.ndarray:
    """The queries an int8 KV cache is scored with: each (token, head) row, scaled as the CPU
    kernels scale it (scale, times log2(e) without a soft-cap), rounded to int8 codes of amax / 127
    in float32, and unscaled again. The kernels multiply int8 codes by int8 codes (VNNI where the
    host has it), so a package computes the same scores on every host."""
    q_scale = np.float32(spec.scale if spec.logit_softcap is not None else spec.scale * np.log2(np.e))
    qf = np.asarray(q).astype(np.float32) * q_scale
    amax = np.abs(qf).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return np.rint(qf * inv) * (amax / np.float32(127)).astype(np.float64) / np.float64(q_scale)


def queries(spec: AttentionSpec, q: np.ndarray) -> np.ndarray:
    """The queries attention scores with: q itself, or its int8 codes' values for an int8 cache."""
    return int8_queries(spec, q) if spec.kv_dtype == "int8" else q


def decode(spec, q, pool, tables, seq_lens):
    q = queries(spec, q)
    out = np.empty(q.shape, np.float64)
    for b, length in enumerate(seq_lens):
        k, v = gather_kv(spec, pool, tables[b], int(length))
        out[b] = attend(spec, q[b : b + 1], k, v, np.array([length - 1]))[0]
    return out


def extend(spec, q, pool, tables, q_indptr, seq_lens):
    q = queries(spec, q)
    out = np.empty(q.shape, np.float64)
    for b, length in enumerate(seq_lens):
        lo, hi = int(q_indptr[b]), int(q_indptr[b + 1])
        k, v = gather_kv(spec, pool, tables[b], int(length))
        positions = np.arange(length - (hi - lo), length)
        out[lo:hi] = attend(spec, q[lo:hi], k, v, positions)
    return out
