"""Math helpers shared by schedule templates (PrimExpr builders, usable inside TVMScript)."""

from __future__ import annotations

import math

from tvm.script import tirx as T

# 2**f = exp(f ln 2) for f in [-0.5, 0.5]: Taylor terms up to degree 6, relative error < 2e-7.
_EXP2_COEFFS = tuple(math.log(2) ** k / math.factorial(k) for k in range(7))


def _pow2(n):
    """2**n for an integral float32 expression -126 <= n <= 127, built in the exponent bits."""
    return T.reinterpret("float32", T.shift_left(T.cast(n, "int32") + 127, 23))


def fast_exp2(x):
    """exp2 of a float32 expression x <= 0, without a libm call, so loops over it vectorize.

    LLVM lowers exp2 to one scalar libm call per element; in decode that is one call per score,
    which cost more than the score's 2*head_dim FLOPs. Inputs below -125 return 0 (the result
    would be denormal and is negligible against the running sum, which is at least 1).
    """
    xc = T.max(x, T.float32(-125.0))
    n = T.round(xc)
    f = xc - n
    p = T.float32(_EXP2_COEFFS[6])
    for c in reversed(_EXP2_COEFFS[:6]):
        p = p * f + T.float32(c)
    return T.if_then_else(x < T.float32(-125.0), T.float32(0), p * _pow2(n))


# exp(r) - 1 for r in [-ln2/2, ln2/2]: Taylor terms up to degree 7, relative error < 1e-8.
_EXP_COEFFS = tuple(1.0 / math.factorial(k) for k in range(8))
# ln 2 split so that n * _LN2_HI is exact in float32 for |n| < 2**9 (Cody-Waite range reduction).
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06


def _exp_parts(x):
    """(2**n, q) with exp(x) = 2**n * (1 + q) for a float32 expression -87 <= x <= 0; q is computed
    without its leading 1, so expm1 keeps its precision near 0."""
    n = T.round(x * T.float32(1.0 / math.log(2)))
    r = x - n * T.float32(_LN2_HI) - n * T.float32(_LN2_LO)
    q = T.float32(_EXP_COEFFS[7])
    for c in reversed(_EXP_COEFFS[2:7]):
        q = q * r + T.float32(c)
    q = (q * r + T.float32(1)) * r
    return _pow2(n), q


def fast_exp_nonpositive(x):
    """exp of a float32 expression x <= 0 within a few ulp, without a libm call (vectorizes).

    Range reduction is Cody-Waite (x = n ln2 + r with ln2 in two parts), so the result keeps
    float32's precision where `fast_exp2(x * log2 e)` loses the rounding of the product
    (about 1e-6 relative at x = -18). Inputs below -87 return 0 (the result would be denormal).
    """
    two_n, q = _exp_parts(T.max(x, T.float32(-87.0)))
    return T.if_then_else(x < T.float32(-87.0), T.float32(0), two_n + two_n * q)


def fast_sigmoid(x):
    """1 / (1 + exp(-x)) of a float32 expression, from exp(-|x|) so that nothing overflows; NaN stays NaN."""
    e = fast_exp_nonpositive(-T.abs(x))
    s = T.if_then_else(x >= T.float32(0), T.float32(1) / (T.float32(1) + e), e / (T.float32(1) + e))
    return T.if_then_else(T.isnan(x), x, s)


def fast_tanh(x):
    """tanh of a float32 expression: copysign(m / (2 - m), x) with m = -expm1(-2|x|).

    expm1 rather than exp: (1 - e) / (1 + e) cancels near 0 (relative error of order 1 at
    x = 1e-3). Odd, signed zeros kept; |x| >= 10 returns +-1 (tanh(10) rounds to 1 in float32);
    NaN stays NaN.
    """
    two_n, q = _exp_parts(T.max(T.float32(-2) * T.abs(x), T.float32(-20.0)))
    m = (T.float32(1) - two_n) - two_n * q
    t = T.if_then_else(T.abs(x) >= T.float32(10.0), T.float32(1), m / (T.float32(2) - m))
    return T.if_then_else(T.isnan(x), x, T.copysign(t, x))


__all__ = ["fast_exp2", "fast_exp_nonpositive", "fast_sigmoid", "fast_tanh"]
