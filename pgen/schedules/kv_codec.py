"""The quantized-KV codec in TIR (kv_dtype int8, fp8_e4m3): reading a value and writing a row.

The same codec as `pgen_runtime.kv_quant` (which documents it), operation for operation in float32,
so a kernel's codes equal NumPy's bit for bit. A quantized pool is one-byte codes with each block's
float32 scales in the rows after its tokens; kernels read the scales through a float32 buffer that
aliases the pool's memory (`T.decl_buffer(..., "float32", data=kv_pool.data)`, indexed by
`scale_index`).
"""

from __future__ import annotations

from tvm.script import tirx as T

from pgen_runtime.kv_quant import qmax  # noqa: F401  # the codec's largest code, for the kernels
from pgen_runtime.spec import AttentionSpec

E4M3_BIAS_SHIFT = 2.0 ** 120  # fp32 exponent bias 127 minus e4m3's 7


def scale_words(spec: AttentionSpec) -> int:
    """float32 words of one (block, K/V, head) slab of the pool (its rows x head_dim bytes / 4)."""
    return spec.pool_rows * spec.head_dim // 4


def scale_index(spec: AttentionSpec, blk, c, h, t):
    """Index in the float32 alias of the pool of the scale of token row t of (blk, c, h); int64, as
    a pool may hold more than 2^31 words."""
    blk = T.Cast("int64", blk)
    return ((blk * 2 + c) * spec.num_kv_heads + h) * scale_words(spec) + spec.block_size * spec.head_dim // 4 + t


def code_offset(spec: AttentionSpec, c, t, x):
    """Byte offset in its slab's code bytes of the code of token row t, element x, of K (c = 0) or V
    (c = 1; c may be an expression): t * head_dim + x, except in an int8 pool, whose slabs are
    4-interleaved (spec.KV_LAYOUT_INT8, kv_quant.pack_codes)."""
    bs, d = spec.block_size, spec.head_dim
    if spec.kv_dtype != "int8":
        return t * d + x
    q = min(4, bs)
    k_off = (x // 4 * bs + t) * 4 + x % 4
    v_off = (t // q * d + x) * q + t % q
    if isinstance(c, int):
        return k_off if c == 0 else v_off
    return T.Select(c == 0, k_off, v_off)


def code_row(spec: AttentionSpec, c, t, x):
    """The slab row (pool axis 3) holding the code of (token row t, element x); see code_offset."""
    return t if spec.kv_dtype != "int8" else code_offset(spec, c, t, x) // spec.head_dim


def code_col(spec: AttentionSpec, c, t, x):
    """The slab column (pool axis 4) holding the code of (token row t, element x)."""
    return x if spec.kv_dtype != "int8" else code_offset(spec, c, t, x) % spec.head_dim


def code_at(spec: AttentionSpec, pool, blk, c, h, t, x):
    """The pool element holding the code of (token row t, element x) of (blk, c, h)."""
    return pool[blk, c, h, code_row(spec, c, t, x), code_col(spec, c, t, x)]


def code_loader(spec: AttentionSpec):
    """f(pool, blk, c, h, t, x): element x of token row t of (blk, c, h) (c = 0 for K, 1 for V) as
    float32, before its row's scale: the value itself for a float pool, the code's value for a
    quantized one."""
    if spec.kv_dtype == "fp8_e4m3":
        return lambda pool, blk, c, h, t, x: decode_e4m3(pool[blk, c, h, t, x])
    if spec.kv_dtype == "int8":
        return lambda pool, blk, c, h, t, x: T.cast(code_at(spec, pool, blk, c, h, t, x), "float32")
    return lambda pool, blk, c, h, t, x: T.cast(pool[blk, c, h, t, x], "float32")


def row_scaler(spec: AttentionSpec):
    """f(value, scales, blk, c, h, t): `value` times the scale of row t of (blk, c, h), which
    kernels apply once per row (to a score, or to a P weight) rather than per element; the value
    itself for a float pool. `scales` is the pool's float32 alias."""
    if not spec.kv_quantized:
        return lambda value, scales, blk, c, h, t: value
    return lambda value, scales, blk, c, h, t: value * scales[scale_index(spec, blk, c, h, t)]


def decode_e4m3(code):
    """float32 value of a uint8 e4m3fn code: its bits placed in an fp32, rescaled by 2^120 (exact,
    subnormals included)."""
    c = T.cast(code, "uint32")
    bits = T.bitwise_or(T.shift_left(T.bitwise_and(c, T.uint32(0x7F)), T.uint32(20)),
                        T.shift_left(T.bitwise_and(c, T.uint32(0x80)), T.uint32(24)))
    return T.reinterpret("float32", bits) * T.float32(E4M3_BIAS_SHIFT)


def encode(spec: AttentionSpec, y):
    """The storage code of float32 y, already scaled into +-QMAX."""
    if spec.kv_dtype == "int8":
        return T.cast(T.round(y), "int8")
    a = T.fabs(y)
    bits = T.reinterpret("uint32", a)
    normal = T.shift_right(bits + T.uint32(0x7FFFF) + T.bitwise_and(T.shift_right(bits, T.uint32(20)), T.uint32(1)),
                           T.uint32(20)) - T.uint32(120 << 3)
    subnormal = T.cast(T.round(a * T.float32(512.0)), "uint32")
    sign = T.bitwise_and(T.shift_right(T.reinterpret("uint32", y), T.uint32(24)), T.uint32(0x80))
    return T.cast(T.bitwise_or(T.Select(a >= T.float32(2.0 ** -6), normal, subnormal), sign), "uint8")

