"""schedules.cpu_dense: the dense layers of a model, scheduled, against numpy; and the model pipeline uses it."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import tirx as T

from pgen.onnx.relax_import import model_pipeline
from pgen.schedules import cpu_dense
from pgen.target import parse_targets

(TARGET,) = parse_targets("llvm")


def _dense(k: int, n: int, epilogue: str) -> tvm.tirx.PrimFunc:
    """A Relax-legalized dense layer over a dynamic token count, with an elementwise epilogue."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, tvm.tirx.Var("num_tokens", "int64"), k], "float32"))
    w = relax.Var("w", relax.TensorType([k, n], "float32"))
    extra = relax.Var("extra", relax.TensorType([n], "float32"))
    with bb.function("main", [x, w, extra]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w))
            if epilogue == "bias":
                y = bb.emit(relax.op.add(y, extra))
            elif epilogue == "silu":
                y = bb.emit(relax.op.multiply(relax.op.multiply(y, relax.op.sigmoid(y)), extra))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    seq = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])
    mod = seq(bb.get())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


def _reference(x, w, extra, epilogue):
    y = x.astype(np.float64) @ w.astype(np.float64)
    if epilogue == "bias":
        y = y + extra
    elif epilogue == "silu":
        y = y / (1 + np.exp(-y)) * extra
    return y


@pytest.mark.parametrize("k,n,epilogue", [(128, 128, "none"), (128, 259, "bias"), (64, 96, "silu"), (32, 8, "none")])
def test_dense_layers_match_numpy_at_ragged_token_counts(k, n, epilogue):
    func = _dense(k, n, epilogue)
    scheduled = cpu_dense.apply(func, TARGET.info)
    assert scheduled is not None, "the rule must take a legalized matmul with an elementwise tail"
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target(TARGET.tvm_target()))
    source = lib.mod.inspect_source("ll") if hasattr(lib, "mod") else lib.inspect_source("ll")
    # The weight pad of pad_einsum is a workspace; the accumulator tile (cache_write's `*_global`)
    # must be a stack array, or LLVM keeps nothing in registers.
    assert not re.search(r"%\w*_(global|local) = tail call ptr", source), "the accumulator tile is a heap workspace"
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    extra = rng.standard_normal(n).astype(np.float32)
    for tokens in (1, 3, 5, 63, 64):  # not multiples of the 4-row tile: the row predicate matters
        x = _aligned(rng.standard_normal((1, tokens, k)).astype(np.float32))
        # The output is a view of a NaN-poisoned buffer with guard rows after it: rows beyond
        # `tokens` must stay untouched (the write-back's row predicate).
        backing = _aligned(np.full((1, tokens + 8, n), np.nan, np.float32))
        out = backing[:, :tokens]
        lib["main"](x, _aligned(w), *([_aligned(extra)] if epilogue != "none" else []), out)
        np.testing.assert_allclose(out, _reference(x, w, extra, epilogue), rtol=2e-5, atol=2e-5)
        assert np.isnan(backing[:, tokens:]).all(), f"rows past num_tokens={tokens} were written"


def _model(k: int, n: int, epilogue: str, w: np.ndarray, extra: np.ndarray, weight_input: bool = False):
    """A Relax function x [tokens, k] -> dense layer with weight `w` (a constant unless
    `weight_input`) and an epilogue, through the model pipeline."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("num_tokens", "int64"), k], "float32"))
    params = [x]
    if weight_input:
        weight = relax.Var("w", relax.TensorType([k, n], "float32"))
        params.append(weight)
    else:
        weight = relax.const(w)
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, weight))
            if epilogue == "bias":
                y = bb.emit(relax.op.add(y, relax.const(extra)))
            elif epilogue == "silu":
                y = bb.emit(relax.op.multiply(relax.op.multiply(y, relax.op.sigmoid(y)), relax.const(extra)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with tvm.target.Target(TARGET.tvm_target()):
        return model_pipeline(TARGET)(bb.get())


@pytest.mark.parametrize("k,n,epilogue", [(128, 128, "none"), (64, 259, "bias"), (96, 64, "silu")])
def test_constant_weights_are_packed_once_at_compile_time(k, n, epilogue):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, n)).astype(np.float32)
    extra = rng.standard_normal(n).astype(np.float32)
    lowered = _model(k, n, epilogue, w, extra)
    names = {gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    called = lowered["main"].script()
    packed = [name for name in names if name.endswith("_prepacked")]
    assert len(packed) == 1, sorted(names)
    assert packed[0] in called
    # FoldConstant ran the packing: the step calls no packing function, it reads a packed constant.
    assert not [name for name in names if name.endswith("_weight_prepack") and name in called]
    executable = tvm.compile(lowered, target=tvm.target.Target(TARGET.tvm_target()))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    for tokens in (1, 3, 5, 63, 64):
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        out = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(out, _reference(x, w, extra, epilogue), rtol=2e-5, atol=2e-5)


def test_a_weight_that_is_an_input_is_not_packed():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    lowered = _model(64, 96, "none", w, w[0], weight_input=True)
    names = {gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert not [name for name in names if "prepack" in name], sorted(names)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=tvm.target.Target(TARGET.tvm_target())), tvm.cpu())
    x = rng.standard_normal((5, 64)).astype(np.float32)
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    np.testing.assert_allclose(out, x.astype(np.float64) @ w, rtol=2e-5, atol=2e-5)


def _aligned(a: np.ndarray) -> np.ndarray:
    """A 64-byte aligned copy: TVM's generated code assumes what its own allocator gives."""
    raw = np.empty(a.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_the_rule_declines_what_is_not_a_dense_layer():
    @T.prim_func(s_tir=True)
    def row_sum(a: T.Buffer((8, 16), "float32"), out: T.Buffer((8,), "float32")):
        for i, k in T.grid(8, 16):
            with T.sblock("sum"):
                vi, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    out[vi] = T.float32(0)
                out[vi] = out[vi] + a[vi, vk]

    assert cpu_dense.apply(row_sum, TARGET.info) is None


def test_rule_config_is_checked():
    assert cpu_dense.check({"rows": 8, "cols": 32}) is not None  # 1 KiB: the heap
    assert cpu_dense.check(cpu_dense.default(TARGET.info)) is None
    with pytest.raises(ValueError, match="rows or cols"):
        cpu_dense.apply(_dense(32, 32, "none"), TARGET.info, {"rows": 8, "cols": 64})


def test_model_pipeline_schedules_every_dense_layer(tmp_path):
    import onnx

    from pgen.build import choose_configs
    from pgen.onnx.compile import layer_specs, model_spec
    from pgen.onnx.relax_import import import_model
    from pgen.onnx.rewrite import rewrite
    from pgen.tiny import TinyConfig, export

    rewritten = rewrite(onnx.load(str(export(tmp_path / "tiny.onnx", TinyConfig()))), 16)
    spec = model_spec(layer_specs(rewritten, 16))
    configs = {n: c.config for n, c in choose_configs(spec, TARGET).items()}
    module = import_model(rewritten.model, spec, TARGET, configs)
    with tvm.target.Target(TARGET.tvm_target()):
        lowered = model_pipeline(TARGET)(module)
    dense = {gv.name_hint: f for gv, f in lowered.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint}
    assert len(dense) >= 5, sorted(dense)  # q, k, v/o, gate/up, down, lm_head (some fused)
    unscheduled = [name for name, f in dense.items() if not f.attrs.get("tirx.is_scheduled", False)]
    assert not unscheduled
