"""Math helpers shared by schedule templates (PrimExpr builders, usable inside TVMScript)."""

from __future__ import annotations

import math

from tvm.script import tirx as T

# 2**f = exp(f ln 2) for f in [-0.5, 0.5]: Taylor terms up to degree 6, relative error < 2e-7.
_EXP2_COEFFS = tuple(math.log(2) ** k / math.factorial(k) for k in range(7))


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
    two_n = T.reinterpret("float32", T.shift_left(T.cast(n, "int32") + 127, 23))
    return T.if_then_else(x < T.float32(-125.0), T.float32(0), p * two_n)


# exp(r) for r in [-ln2/2, ln2/2]: Taylor terms up to degree 7, relative error < 1e-8.
_EXP_COEFFS = tuple(1.0 / math.factorial(k) for k in range(8))
# ln 2 split so that n * _LN2_HI is exact in float32 for |n| < 2**9 (Cody-Waite range reduction).
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06


def fast_exp_nonpositive(x):
    """exp of a float32 expression x <= 0 within a few ulp, without a libm call (vectorizes).

    Range reduction is Cody-Waite (x = n ln2 + r with ln2 in two parts), so the result keeps
    float32's precision where `fast_exp2(x * log2 e)` loses the rounding of the product
    (about 1e-6 relative at x = -18). Inputs below -87 return 0 (the result would be denormal).
    """
    xc = T.max(x, T.float32(-87.0))
    n = T.round(xc * T.float32(1.0 / math.log(2)))
    r = xc - n * T.float32(_LN2_HI) - n * T.float32(_LN2_LO)
    p = T.float32(_EXP_COEFFS[7])
    for c in reversed(_EXP_COEFFS[:7]):
        p = p * r + T.float32(c)
    two_n = T.reinterpret("float32", T.shift_left(T.cast(n, "int32") + 127, 23))
    return T.if_then_else(x < T.float32(-87.0), T.float32(0), p * two_n)


def fast_sigmoid(x):
    """1 / (1 + exp(-x)) of a float32 expression, from exp(-|x|) so that nothing overflows; NaN stays NaN."""
    e = fast_exp_nonpositive(-T.abs(x))
    s = T.if_then_else(x >= T.float32(0), T.float32(1) / (T.float32(1) + e), e / (T.float32(1) + e))
    return T.if_then_else(T.isnan(x), x, s)


__all__ = ["fast_exp2", "fast_exp_nonpositive", "fast_sigmoid"]
