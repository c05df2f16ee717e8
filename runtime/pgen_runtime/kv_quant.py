"""Quantized KV pools (kv_dtype int8, fp8_e4m3) in NumPy: the codec the kernels implement, bit for bit.

Each cached (token, head) row of K or V gets its own float32 scale, amax(|row|) / QMAX (QMAX = 127
for int8, 448 for fp8 e4m3), and codes = round(row * (QMAX / amax)) (int8: to nearest even, clamped
to +-127; fp8: e4m3 "fn" to nearest even, clamped to +-448). A row of zeros has scale 0. A value is
code * scale. The scales live in the pool, after each block's token rows (spec.KV_LAYOUT_QUANTIZED);
an int8 pool stores each slab's code bytes 4-interleaved for integer dot products
(spec.KV_LAYOUT_INT8, `pack_codes`), so read and write codes through `pool_codes` / `set_pool_codes`.

References, tests and tools use these functions; `pgen.schedules.kv_codec` is the same codec in TIR.
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError
from .spec import QUANTIZED_KV, AttentionSpec

_E4M3_MIN_NORMAL = np.float32(2.0 ** -6)
_E4M3_BIAS_SHIFT = np.float32(2.0 ** 120)  # fp32 exponent bias 127 minus e4m3's 7


def qmax(spec: AttentionSpec) -> float:
    return QUANTIZED_KV[spec.kv_dtype][1]


def quantize_rows(spec: AttentionSpec, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (spec.kv_storage_dtype, rows' shape) and float32 scales (rows' shape less the last axis)
    of rows [..., head_dim], computed in float32 as the cache_write kernel does."""
    x = np.asarray(rows).astype(np.float32)
    amax = np.abs(x).max(axis=-1)
    top = np.float32(qmax(spec))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(amax > 0, top / amax, np.float32(0)).astype(np.float32)
        scales = (amax / top).astype(np.float32)
    y = np.clip(x * inv[..., None], -top, top).astype(np.float32)
    if spec.kv_dtype == "int8":
        return np.rint(y).astype(np.int8), scales
    return encode_e4m3(y), scales


def dequantize_rows(spec: AttentionSpec, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values code * scale of codes [..., head_dim] with scales [...]."""
    values = codes.astype(np.float32) if spec.kv_dtype == "int8" else decode_e4m3(codes)
    return values * scales[..., None]


def encode_e4m3(y: np.ndarray) -> np.ndarray:
    """uint8 e4m3fn codes of float32 y with |y| <= 448, rounded to nearest even."""
    bits = y.view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    a = np.abs(y)
    abits = a.view(np.uint32).astype(np.int64)
    normal = ((abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20) - (120 << 3)
    subnormal = np.rint(a * np.float32(512)).astype(np.int64)  # steps of 2^-9; 8 is 2^-6, e=1 m=0
    return (np.where(a >= _E4M3_MIN_NORMAL, normal, subnormal).astype(np.uint8) | sign).astype(np.uint8)


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """float32 values of uint8 e4m3fn codes (no NaN codes: the encoder never writes one)."""
    c = codes.astype(np.uint32)
    bits = ((c & 0x7F) << 20) | ((c & 0x80) << 24)
    return bits.view(np.float32) * _E4M3_BIAS_SHIFT


def pool_scales(spec: AttentionSpec, pool: np.ndarray) -> np.ndarray:
    """The float32 scales [num_blocks, 2, Hkv, block_size] of a quantized pool (a copy)."""
    _check(spec, pool)
    nb, _, hkv, _, d = pool.shape
    raw = np.ascontiguousarray(pool[:, :, :, spec.block_size:, :]).reshape(nb, 2, hkv, -1)
    return raw[..., : 4 * spec.block_size].copy().view(np.float32)


def set_pool_scales(spec: AttentionSpec, pool: np.ndarray, scales: np.ndarray) -> None:
    """Write float32 scales [num_blocks, 2, Hkv, block_size] into a quantized pool, in place."""
    _check(spec, pool)
    nb, _, hkv, rows, d = pool.shape
    raw = np.zeros((nb, 2, hkv, (rows - spec.block_size) * d), pool.dtype)
    raw[..., : 4 * spec.block_size] = np.ascontiguousarray(scales, np.float32).view(pool.dtype).reshape(nb, 2, hkv, -1)
    pool[:, :, :, spec.block_size:, :] = raw.reshape(nb, 2, hkv, rows - spec.block_size, d)


def v_quad(spec: AttentionSpec) -> int:
    """Tokens interleaved per 32-bit lane in an int8 pool's V slabs: min(4, block_size)."""
    return min(4, spec.block_size)


def pack_codes(spec: AttentionSpec, codes: np.ndarray, kv: int) -> np.ndarray:
    """The stored bytes [..., block_size, head_dim] of a slab's codes [..., block_size, head_dim] in
    token-row order, for K (kv=0) or V (kv=1): an int8 pool's 4-interleaved order
    (spec.KV_LAYOUT_INT8), the codes themselves for fp8."""
    if spec.kv_dtype != "int8":
        return codes
    bs, d = spec.block_size, spec.head_dim
    lead = codes.shape[:-2]
    if kv == 0:  # [BS, D/4, 4] -> [D/4, BS, 4]
        packed = codes.reshape(*lead, bs, d // 4, 4).swapaxes(-3, -2)
    else:  # [BS/Q, Q, D] -> [BS/Q, D, Q]
        q = v_quad(spec)
        packed = codes.reshape(*lead, bs // q, q, d).swapaxes(-2, -1)
    return np.ascontiguousarray(packed).reshape(*lead, bs, d)


def unpack_codes(spec: AttentionSpec, stored: np.ndarray, kv: int) -> np.ndarray:
    """Token-row codes [..., block_size, head_dim] of a slab's stored bytes (inverse of pack_codes)."""
    if spec.kv_dtype != "int8":
        return stored
    bs, d = spec.block_size, spec.head_dim
    lead = stored.shape[:-2]
    if kv == 0:
        rows = stored.reshape(*lead, d // 4, bs, 4).swapaxes(-3, -2)
    else:
        q = v_quad(spec)
        rows = stored.reshape(*lead, bs // q, d, q).swapaxes(-2, -1)
    return np.ascontiguousarray(rows).reshape(*lead, bs, d)


def pool_codes(spec: AttentionSpec, pool: np.ndarray) -> np.ndarray:
    """The codes [num_blocks, 2, Hkv, block_size, head_dim] of a quantized pool in token-row order
    (a copy)."""
    _check(spec, pool)
    stored = pool[:, :, :, : spec.block_size, :]
    return np.stack([unpack_codes(spec, stored[:, kv], kv) for kv in (0, 1)], axis=1)


def set_pool_codes(spec: AttentionSpec, pool: np.ndarray, codes: np.ndarray) -> None:
    """Write token-row codes [num_blocks, 2, Hkv, block_size, head_dim] into a quantized pool, in
    place (a single slab's codes [block_size, head_dim] per K/V broadcast to every block and head)."""
    _check(spec, pool)
    for kv in (0, 1):
        pool[:, kv, :, : spec.block_size, :] = pack_codes(spec, codes[:, kv] if codes.ndim == 5 else codes[kv], kv)


def dequantize_pool(spec: AttentionSpec, pool: np.ndarray) -> np.ndarray:
    """float32 [num_blocks, 2, Hkv, block_size, head_dim] values of a quantized pool (NaN scales,
    the tests' poison for unused slots, stay NaN)."""
    return dequantize_rows(spec, pool_codes(spec, pool), pool_scales(spec, pool))


def quantize_pool(spec: AttentionSpec, values: np.ndarray) -> np.ndarray:
    """A quantized pool of values [num_blocks, 2, Hkv, block_size, head_dim]; a row that is NaN
    anywhere gets a NaN scale (and codes of its other values)."""
    nb = values.shape[0]
    if values.shape != (nb, 2, spec.num_kv_heads, spec.block_size, spec.head_dim):
        raise ShapeError(f"values has shape {values.shape}; expected {(nb, 2, spec.num_kv_heads, spec.block_size, spec.head_dim)}")
    poisoned = np.isnan(values).any(axis=-1)
    codes, scales = quantize_rows(spec, np.nan_to_num(values, nan=0.0))
    scales[poisoned] = np.nan
    pool = np.zeros(spec.pool_shape(nb), spec.kv_storage_dtype)
    set_pool_codes(spec, pool, codes)
    set_pool_scales(spec, pool, scales)
    return pool


def _check(spec: AttentionSpec, pool: np.ndarray) -> None:
    if not spec.kv_quantized:
        raise ShapeError(f"kv_dtype={spec.kv_dtype!r} is not quantized; this pool holds values, not codes")
    if pool.ndim != 5 or pool.shape[1:] != spec.pool_shape()[1:] or pool.dtype != np.dtype(spec.kv_storage_dtype):
        raise ShapeError(f"pool has shape {pool.shape} and dtype {pool.dtype}; expected {spec.pool_shape('*')} "
                         f"of {spec.kv_storage_dtype}")
