"""bf16 weights for a compiled model's dense layers (`compile-model --weight-dtype bfloat16`).

Every `matmul(x, W)` whose W is a float32 constant [K, N] (K even) becomes two TE functions:
`bf16_bits(x)`, the activations rounded to bfloat16 (round to nearest even) and kept as their
uint16 bit patterns, and `dense_bf16(bits, W_bits)`, whose reduction widens both operands back to
float32 (`bits << 16`) and accumulates in float32. W_bits is converted here, at compile time, with
the same rounding (`to_bf16_bits`), so the model embeds 2 bytes per weight instead of 4.

The dtype stays an integer one on purpose: TVM 0.27's BF16 legalization would turn a `bfloat16`
buffer's arithmetic back into float32 conversions everywhere, hiding the pairs that the dense rule
(`schedules.cpu_dense`) feeds to AVX-512 BF16's `vdpbf16ps` (32 products per instruction, twice an
fp32 FMA's). On a CPU without it the same function runs as float32 FMAs on widened weights, still
reading half the bytes.

Attention, norms, rotary and the cache stay in the export's dtype; only the weights of the
matmuls, and the activations entering them, are rounded.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

from ..schedules.cpu_dense import widen_bf16

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
# The weight dtypes each target kind compiles: bf16 through the CPU dense rule's AVX-512 BF16 path,
# fp16 through dlight's tensor-core matmul rule on CUDA.
WEIGHT_DTYPES_BY_KIND = {"llvm": ("float32", "bfloat16"), "cuda": ("float32", "float16")}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # uint32 cannot overflow here but for NaNs (exponent all ones), which are set below.
    with np.errstate(over="ignore"):
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _round_bits(x: tirx.PrimExpr) -> tirx.PrimExpr:
    u = tirx.reinterpret("uint32", x)
    one = tirx.const(1, "uint32")
    sixteen = tirx.const(16, "uint32")
    lsb = tirx.bitwise_and(tirx.shift_right(u, sixteen), one)
    rounded = tirx.shift_right(u + tirx.const(0x7FFF, "uint32") + lsb, sixteen)
    # A NaN's payload could carry into the exponent's rounding: keep it a quiet NaN.
    return tirx.Select(x != x, tirx.const(0x7FC0, "uint16"), rounded.astype("uint16"))


def _bits_te(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: _round_bits(x(*i)), name="bf16_bits")


def _dense_te(a: te.Tensor, w: te.Tensor) -> te.Tensor:
    k = te.reduce_axis((0, w.shape[0]), name="k")
    *batch, _ = a.shape
    return te.compute((*batch, w.shape[1]),
                      lambda *i: te.sum(widen_bf16(a(*i[:-1], k)) * widen_bf16(w[k, i[-1]]), axis=k),
                      name="dense_bf16")


def bf16_weights() -> tvm.transform.Pass:
    """The Relax pass: float32 constant-weight matmuls -> bf16 weights (see the module doc).

    One `bf16_bits` per activation however many matmuls read it (Q/K/V, gate/up projections).
    """
    matmul = tvm.ir.Op.get("relax.matmul")

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule):
            super().__init__(mod)
            self.mod_ = mod
            self.bits: dict = {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(matmul) or len(call.args) != 2:
                return call
            x, w = call.args
            if not isinstance(w, tvm.ir.expr.GenericConst):
                return call
            data = w.value.numpy()
            if data.dtype != np.float32 or data.ndim != 2 or data.shape[0] % 2:
                return call
            if getattr(x.ty, "dtype", None) != "float32" or getattr(call.ty, "dtype", None) != "float32":
                return call
            key = x if isinstance(x, relax.Var) else None
            bits = self.bits.get(key) if key is not None else None
            if bits is None:
                bits = self.builder_.emit(self.builder_.call_te(_bits_te, x, primfunc_name_hint="bf16_bits"))
                if key is not None:
                    self.bits[key] = bits
            weight = relax.const(to_bf16_bits(data), "uint16")
            return self.builder_.call_te(_dense_te, bits, weight, primfunc_name_hint="dense_bf16",
                                         primfunc_attrs={"op_pattern": 4})  # OutEWiseFusable: epilogues fuse

        def transform(self) -> tvm.IRModule:
            for gvar, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self.bits = {}
                    self.builder_.update_func(gvar, self.visit_expr(func))
            return self.builder_.get()

    @tvm.transform.module_pass(opt_level=0, name="pgen.Bf16Weights")
    def pass_(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _Mutator(mod).transform()

    return pass_


def half_weights(dtype: str = "float16") -> tvm.transform.Pass:
    """The Relax pass of a CUDA model: every float32 matmul with a constant weight runs on `dtype`
    operands with float32 accumulation (`matmul(astype(x), W_half, out_dtype="float32")`).

    The weight is converted here, at compile time (half its bytes in the package); dlight's
    matmul rule tensorizes float16 x float16 -> float32 for tensor cores. The matmul's output
    stays float32, so norms, rotary, attention and the LM head's logits keep the export's dtype.
    """
    if dtype != "float16":
        raise ValueError(f"half_weights: dtype {dtype!r}; only float16 runs on dlight's tensor-core rule")
    matmul = tvm.ir.Op.get("relax.matmul")

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule):
            super().__init__(mod)
            self.mod_ = mod
            self.cast: dict = {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(matmul) or len(call.args) != 2:
                return call
            x, w = call.args
            if not isinstance(w, tvm.ir.expr.GenericConst) or w.value.numpy().dtype != np.float32:
                return call
            if getattr(x.ty, "dtype", None) != "float32" or getattr(call.ty, "dtype", None) != "float32":
                return call
            half = self.cast.get(x) if isinstance(x, relax.Var) else None
            if half is None:
                half = self.builder_.emit(relax.op.astype(x, dtype))
                if isinstance(x, relax.Var):
                    self.cast[x] = half  # one cast per activation (Q/K/V, gate/up)
            weight = relax.const(w.value.numpy().astype(np.float16), dtype)
            return relax.op.matmul(half, weight, out_dtype="float32")

        def transform(self) -> tvm.IRModule:
            for gvar, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self.cast = {}
                    self.builder_.update_func(gvar, self.visit_expr(func))
            return self.builder_.get()

    @tvm.transform.module_pass(opt_level=0, name="pgen.HalfWeights")
    def pass_(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _Mutator(mod).transform()

    return pass_
