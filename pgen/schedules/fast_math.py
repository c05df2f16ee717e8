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


__all__ = ["fast_exp2"]
