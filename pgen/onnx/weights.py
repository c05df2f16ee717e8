"""bf16, int8 and fp16 weights for a compiled model's dense layers (`compile-model --weight-dtype`).

`int8_weights` (CPU, W8A8 with AVX-512 VNNI) and `half_weights` (CUDA, fp16 on tensor cores)
are described where they are defined. bfloat16 (CPU, `bf16_weights`):

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

WEIGHT_DTYPES = ("float32", "bfloat16", "int8", "float16")
# The weight dtypes each target kind compiles: bf16 and int8 through the CPU dense rule's AVX-512
# BF16 and VNNI paths, fp16 through dlight's tensor-core matmul rule on CUDA.
WEIGHT_DTYPES_BY_KIND = {"llvm": ("float32", "bfloat16", "int8"), "cuda": ("float32", "float16")}


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


def _constant_weight_pass(name: str, convert_input, dense, k_multiple: int | None) -> tvm.transform.Pass:
    """A Relax pass over every float32 `matmul(x, W)` whose W is a float32 constant: 2-D with K a
    multiple of `k_multiple` (None: any constant weight).

    `convert_input(builder, x)` returns x in the layer's operand form and runs once per activation
    however many matmuls read it (Q/K/V, gate/up projections); `dense(builder, converted, W)` (W as
    numpy) returns the matmul's replacement.
    """
    matmul = tvm.ir.Op.get("relax.matmul")

    def eligible_weight(x, w, call) -> np.ndarray | None:
        """W as numpy (one copy of it) where the matmul is one to rewrite, else None."""
        if not isinstance(w, tvm.ir.expr.GenericConst):
            return None
        if getattr(x.ty, "dtype", None) != "float32" or getattr(call.ty, "dtype", None) != "float32":
            return None
        data = w.value.numpy()
        if data.dtype != np.float32 or (k_multiple is not None and (data.ndim != 2 or data.shape[0] % k_multiple)):
            return None
        return data

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule):
            super().__init__(mod)
            self.mod_ = mod
            self.converted: dict = {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(matmul) or len(call.args) != 2:
                return call
            x, w = call.args
            data = eligible_weight(x, w, call)
            if data is None:
                return call
            key = x if isinstance(x, relax.Var) else None
            converted = self.converted.get(key) if key is not None else None
            if converted is None:
                converted = convert_input(self.builder_, x)
                if key is not None:
                    self.converted[key] = converted
            return dense(self.builder_, converted, data)

        def transform(self) -> tvm.IRModule:
            for gvar, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self.converted = {}
                    self.builder_.update_func(gvar, self.visit_expr(func))
            return self.builder_.get()

    @tvm.transform.module_pass(opt_level=0, name=name)
    def pass_(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _Mutator(mod).transform()

    return pass_


def bf16_weights() -> tvm.transform.Pass:
    """The Relax pass: float32 constant-weight matmuls -> bf16 weights (see the module doc).

    One `bf16_bits` per activation however many matmuls read it (Q/K/V, gate/up projections).
    """
    def bits(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        return bb.emit(bb.call_te(_bits_te, x, primfunc_name_hint="bf16_bits"))

    def dense(bb: relax.BlockBuilder, x_bits: relax.Expr, w: np.ndarray) -> relax.Expr:
        return bb.call_te(_dense_te, x_bits, relax.const(to_bf16_bits(w), "uint16"), primfunc_name_hint="dense_bf16",
                          primfunc_attrs={"op_pattern": 4})  # OutEWiseFusable: epilogues fuse

    return _constant_weight_pass("pgen.Bf16Weights", bits, dense, k_multiple=2)


def half_weights(dtype: str = "float16") -> tvm.transform.Pass:
    """The Relax pass of a CUDA model: every float32 matmul with a constant weight runs on `dtype`
    operands with float32 accumulation (`matmul(astype(x), W_half, out_dtype="float32")`).

    The weight is converted here, at compile time (half its bytes in the package); dlight's
    matmul rule tensorizes float16 x float16 -> float32 for tensor cores. The matmul's output
    stays float32, so norms, rotary, attention and the LM head's logits keep the export's dtype.
    """
    if dtype != "float16":
        raise ValueError(f"half_weights: dtype {dtype!r}; only float16 runs on dlight's tensor-core rule")

    def cast(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        return bb.emit(relax.op.astype(x, dtype))

    def dense(bb: relax.BlockBuilder, x_half: relax.Expr, w: np.ndarray) -> relax.Expr:
        return relax.op.matmul(x_half, relax.const(w.astype(np.float16), dtype), out_dtype="float32")

    return _constant_weight_pass("pgen.HalfWeights", cast, dense, k_multiple=None)


# ---- int8 weights and activations (W8A8) ------------------------------------------------------

INT8_MAX = 127
ACT_OFFSET = 128  # vpdpbusd multiplies unsigned by signed bytes: codes are stored offset to [1, 255]
QUANT_LANES = 16  # the activation quantizer's partial maxima: one vector of float32 lanes


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 [K, N] -> (int8 codes [K, N], float32 scale [N], int32 offset term [N]).

    Symmetric per output column: scale = max |W[:, n]| / 127 (1 for an all-zero column), codes in
    [-127, 127]. The offset term is 128 * sum_k codes[k, n], what the activations' +128 adds.
    """
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scale, (ACT_OFFSET * codes.astype(np.int64).sum(axis=0)).astype(np.int32)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The activation quantizer in numpy (what `act_quant` computes): per row, scale = max |x| /
    127 (1 for an all-zero row) and codes = rint(x / scale) + 128 as uint8."""
    amax = np.abs(x).max(axis=-1)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -INT8_MAX, INT8_MAX) + ACT_OFFSET
    return q.astype(np.uint8), scale


def _act_quant_te(x: te.Tensor) -> list[te.Tensor]:
    """x [.., M, K] -> codes [.., M, K] uint8 and scale [.., M] float32 (see `quantize_rows`).

    The row maximum goes through QUANT_LANES partial maxima (lane l covers k = l, l + 16, ...) so
    that `schedules.cpu_dense.schedule_act_quant` can vectorize it over the lanes."""
    *lead, k_dim = x.shape
    lanes = QUANT_LANES if int(k_dim) % QUANT_LANES == 0 else 1
    c = te.reduce_axis((0, int(k_dim) // lanes), name="c")
    part = te.compute((*lead, lanes), lambda *i: te.max(tirx.abs(x(*i[:-1], c * lanes + i[-1])), axis=c),
                      name="act_amax_part")
    l_axis = te.reduce_axis((0, lanes), name="l")
    amax = te.compute(tuple(lead), lambda *i: te.max(part(*i, l_axis), axis=l_axis), name="act_amax")
    scale = te.compute(tuple(lead), lambda *i: tirx.Select(amax(*i) > 0, amax(*i) / tirx.const(INT8_MAX, "float32"),
                                                           tirx.const(1.0, "float32")), name="act_scale")

    def code(*i):
        q = tirx.round(x(*i) / scale(*i[:-1]))
        q = tirx.max(tirx.min(q, tirx.const(INT8_MAX, "float32")), tirx.const(-INT8_MAX, "float32"))
        return (q + tirx.const(ACT_OFFSET, "float32")).astype("int32").astype("uint8")

    codes = te.compute(x.shape, code, name="act_codes")
    return [codes, scale]


def _dense_int8_te(codes: te.Tensor, scale: te.Tensor, w: te.Tensor, w_scale: te.Tensor,
                   offset: te.Tensor) -> te.Tensor:
    k = te.reduce_axis((0, w.shape[0]), name="k")
    *batch, _ = codes.shape
    acc = te.compute((*batch, w.shape[1]),
                     lambda *i: te.sum(codes(*i[:-1], k).astype("int32") * w[k, i[-1]].astype("int32"), axis=k),
                     name="dense_int8")
    return te.compute(acc.shape, lambda *i: (acc(*i) - offset[i[-1]]).astype("float32") * scale(*i[:-1]) *
                      w_scale[i[-1]], name="dense_int8_scale")


def int8_weights() -> tvm.transform.Pass:
    """The Relax pass of `--weight-dtype int8` (CPU): float32 constant-weight matmuls (K a multiple
    of 4) -> int8 weights per output column and int8 activations per token row, int32 sums by
    AVX-512 VNNI's vpdpbusd (64 byte products per instruction: twice vdpbf16ps's, at half its
    weight bytes), rescaled to float32 in the matmul's epilogue.

    One `act_quant` per activation however many matmuls read it (Q/K/V, gate/up).
    """
    def quantize(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        # Opaque: FuseOps leaves it whole, so the dense rule finds and schedules it.
        return bb.emit(bb.call_te(_act_quant_te, x, primfunc_name_hint="act_quant",
                                  primfunc_attrs={"op_pattern": 8, ACT_QUANT: True}))

    def dense(bb: relax.BlockBuilder, quant: relax.Expr, w: np.ndarray) -> relax.Expr:
        codes, scale = (bb.emit(relax.TupleGetItem(quant, i)) for i in range(2))
        w_codes, w_scale, offset = quantize_weight(w)
        return bb.call_te(_dense_int8_te, codes, scale, relax.const(w_codes, "int8"), relax.const(w_scale),
                          relax.const(offset, "int32"), primfunc_name_hint="dense_int8",
                          primfunc_attrs={"op_pattern": 4})  # OutEWiseFusable: epilogues fuse

    return _constant_weight_pass("pgen.Int8Weights", quantize, dense, k_multiple=4)


ACT_QUANT = "pgen.act_quant"  # a PrimFunc attribute: the activation quantizer of int8 weights
