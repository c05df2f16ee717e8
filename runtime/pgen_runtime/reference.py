"""Float64 NumPy references of decode and extend, gathering K/V through the block table.

The compiler's tests and `pgen check` use them (through pgen.reference), and so does the runtime's
tuning measurement, which rejects a candidate whose output disagrees (`measure.check_output`).
"""

from __future__ import annotations

import numpy as np

from .kv_quant import dequantize_pool, pool_scales
from .spec import AttentionSpec

# The largest error of an int8 cache's attention output, relative to its largest value, that a
# check allows where it does not compute `weight_rounding_allowance`: P·V's u8 weights (pv_int8)
# add up to half a code of 1/255 per weight (measured: 5e-3 of a row's largest value, random K/V).
INT8_KV_TOLERANCE = 2e-2


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
    p = weights(spec, q, k, positions)
    return np.einsum("hnl,lhd->nhd", p, np.repeat(v, spec.group_size, axis=1))


def weights(spec: AttentionSpec, q: np.ndarray, k: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The softmax weights [Hq, n, L] of query rows q [n, Hq, D] at `positions` over keys k."""
    g = spec.group_size
    kk = np.repeat(k, g, axis=1)  # [L, Hq, D]
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
    return p


def weight_rounding_allowance(spec: AttentionSpec, q, pool, tables, seq_lens, q_indptr=None) -> np.ndarray:
    """Per output value [NT, Hq, D], the most that P·V with u8 weights (an int8 cache's pv_int8) may
    move decode (q_indptr None) or extend from `decode`/`extend`: each weight times its V row's
    scale is rounded to a code of 1/255 of the largest such product in its (row, block), so by at
    most half of that, times the |V codes| it multiplies, summed over the row's blocks (in
    normalized weights; the running max the kernel uses cancels). Zero for other caches."""
    q = queries(spec, q)
    out = np.zeros(q.shape, np.float64)
    if spec.kv_dtype != "int8":
        return out
    bs = spec.block_size
    for b, length in enumerate(seq_lens):
        length = int(length)
        lo, hi = (b, b + 1) if q_indptr is None else (int(q_indptr[b]), int(q_indptr[b + 1]))
        if hi == lo:
            continue
        k, v = gather_kv(spec, pool, tables[b], length)
        pos = np.arange(length)
        used, inverse = np.unique(tables[b][pos // bs], return_inverse=True)
        vs = pool_scales(spec, pool[used])[inverse, 1, :, pos % bs]  # [L, Hkv]
        with np.errstate(invalid="ignore", divide="ignore"):
            codes = np.abs(np.where(vs[..., None] > 0, v / vs[..., None], 0.0))  # [L, Hkv, D]
        p = weights(spec, q[lo:hi], k, np.arange(length - (hi - lo), length))  # [Hq, n, L]
        g = spec.group_size
        w = p * np.repeat(vs.T, g, axis=0)[:, None, :]  # weight x V scale
        nblk = -(-length // bs)
        pad = nblk * bs - length
        wb = np.pad(w, ((0, 0), (0, 0), (0, pad))).reshape(*w.shape[:2], nblk, bs).max(axis=-1)  # [Hq, n, blocks]
        cb = np.pad(np.repeat(codes, g, axis=1), ((0, pad), (0, 0), (0, 0))).reshape(nblk, bs, q.shape[1], -1).sum(axis=1)
        out[lo:hi] = np.einsum("hnb,bhd->nhd", wb / 510.0, cb)
    return out


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
