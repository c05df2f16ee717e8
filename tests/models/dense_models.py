"""Relax models of one activation read by two matmuls of a constant weight, lowered through
compile-model's CPU pipeline: what the weight-dtype tests (bf16, int8) compile and compare."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from pgen.onnx.relax_import import model_pipeline


def two_matmul_model(k: int, n: int, epilogue: str, w: np.ndarray, extra: np.ndarray, weight_dtype: str, target):
    """`f(x @ W) + x @ W` lowered for `target`: f is nothing, `+ extra` ("bias") or `silu(.) * extra`
    ("silu"). The second matmul reads x again, so x is converted (rounded, quantized) once."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("num_tokens", "int64"), k], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            if epilogue == "bias":
                y = bb.emit(relax.op.add(y, relax.const(extra)))
            elif epilogue == "silu":
                y = bb.emit(relax.op.multiply(relax.op.multiply(y, relax.op.sigmoid(y)), relax.const(extra)))
            z = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(relax.op.add(y, z))
        bb.emit_func_output(out)
    with tvm.target.Target(target.tvm_target()):
        return model_pipeline(target, weight_dtype)(bb.get())
