"""Float32 sigmoid and tanh inline (`relax_import.fast_legalize`): as accurate as libm's, and no
libm call left in the epilogue of a dense layer, so the epilogue vectorizes."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te

from pgen.onnx.relax_import import model_pipeline
from pgen.schedules.fast_math import fast_sigmoid, fast_tanh
from pgen.target import parse_targets

(TARGET,) = parse_targets("llvm")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


CASES = {"sigmoid": (fast_sigmoid, _sigmoid, relax.op.sigmoid, (1.0, 0.0)),
         "tanh": (fast_tanh, lambda x: np.tanh(x.astype(np.float64)), relax.op.tanh, (1.0, -1.0))}


@pytest.mark.parametrize("name", CASES)
def test_matches_float64_over_the_whole_range(name):
    fn, ref_fn, _, at_inf = CASES[name]
    n = 1 << 16
    a = te.placeholder((n,), "float32", name="a")
    run = tvm.compile(te.create_prim_func([a, te.compute((n,), lambda i: fn(a[i]))]), target="llvm")
    edges = [0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 9.5, 10.0, -10.0, 88.0, -88.0, np.nan, np.inf, -np.inf]
    x = np.concatenate([np.linspace(-200, 200, n // 2), np.linspace(-3, 3, n // 2 - len(edges)), edges])
    x = x.astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    run(tvm.runtime.tensor(x), out)
    assert np.isnan(out.numpy()[-3])  # a NaN activation is not turned into a number
    assert tuple(out.numpy()[-2:]) == at_inf
    x, out = x[:-3], out.numpy()[:-3]
    ref = ref_fn(x)
    normal = np.abs(ref) > 1e-37  # below it float32 flushes to 0 (or a denormal), as libm's does
    np.testing.assert_allclose(out[normal], ref[normal], rtol=3e-7, atol=0)
    np.testing.assert_array_less(np.abs(out[~normal]), 1e-37)
    if name == "tanh":
        np.testing.assert_array_equal(np.signbit(out[x == 0]), np.signbit(x[x == 0]))  # odd, signed zeros kept


@pytest.mark.parametrize("name", CASES)
def test_dense_layer_epilogue_has_no_libm_call_and_matches_numpy(name):
    _, ref_fn, op, _ = CASES[name]
    rng = np.random.default_rng(3)
    k, n = 64, 96
    w = (rng.standard_normal((k, n)) * 2).astype(np.float32)  # pre-activations up to about +-60
    up = rng.standard_normal(n).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("num_tokens", "int64"), k], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(relax.op.multiply(relax.op.multiply(y, op(y)), relax.const(up)))
        bb.emit_func_output(out)
    with tvm.target.Target(TARGET.tvm_target()):
        lowered = model_pipeline(TARGET)(bb.get())
    names = [gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("matmul" in nm and name in nm for nm in names), names  # still one fused kernel
    executable = tvm.compile(lowered, target=tvm.target.Target(TARGET.tvm_target()))
    asm = executable.mod.imports[0].inspect_source("asm") if executable.mod.imports else ""
    assert asm and "expf" not in asm and "tanhf" not in asm  # TVM's own tanh calls expf
    vm = relax.VirtualMachine(executable, tvm.cpu())
    for tokens in (1, 5, 33):
        xs = rng.standard_normal((tokens, k)).astype(np.float32)
        pre = xs.astype(np.float64) @ w.astype(np.float64)
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xs)).numpy(), pre * ref_fn(pre) * up,
                                   rtol=1e-5, atol=1e-5)
