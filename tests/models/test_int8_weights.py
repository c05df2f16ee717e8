"""int8 weights (`compile-model --weight-dtype int8`, W8A8): the quantizers, the dense rule's VNNI
path against numpy on the same codes, and a model compiled and verified."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from pgen import tiny
from pgen.onnx import compile_model
from pgen.onnx.weights import ACT_OFFSET, INT8_MAX, quantize_rows, quantize_weight
from pgen.schedules import cpu_dense
from pgen.target import parse_targets
from pgen_runtime.errors import SpecError

from dense_models import two_matmul_model  # tests/models/, on sys.path (conftest.py)

(TARGET,) = parse_targets("llvm")
VNNI = cpu_dense.has_vnni(TARGET.info)
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has no avx512_vnni")


def test_quantizers_round_to_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column keeps scale 1 and codes 0
    codes, scale, offset = quantize_weight(w)
    assert codes.dtype == np.int8 and np.abs(codes).max() == INT8_MAX and scale[3] == 1.0 and not codes[:, 3].any()
    assert np.all(np.abs(codes * scale - w) <= scale / 2 + 1e-7)
    np.testing.assert_array_equal(offset, ACT_OFFSET * codes.astype(np.int64).sum(axis=0))
    x = rng.standard_normal((5, 96)).astype(np.float32) * np.array([[1e-3], [1], [30], [0], [1e4]], np.float32)
    q, sx = quantize_rows(x)
    assert q.dtype == np.uint8 and q.min() >= ACT_OFFSET - INT8_MAX and q.max() <= ACT_OFFSET + INT8_MAX
    assert sx[3] == 1.0 and np.all(q[3] == ACT_OFFSET)
    assert np.all(np.abs((q.astype(np.float32) - ACT_OFFSET) * sx[:, None] - x) <= sx[:, None] / 2 * (1 + 1e-6))


@needs_vnni
@pytest.mark.parametrize("k,n,epilogue", [(128, 128, "none"), (64, 259, "bias"), (96, 64, "silu")])
def test_int8_dense_layers_match_numpy_on_the_same_codes(k, n, epilogue):
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    extra = rng.standard_normal(n).astype(np.float32)
    lowered = two_matmul_model(k, n, epilogue, w, extra, "int8", TARGET)
    prims = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert [name for name in prims if name.startswith("act_quant")] == ["act_quant"]  # x quantized once
    assert all(f.attrs.get("tirx.is_scheduled", False) for name, f in prims.items() if "dense_int8" in name)
    executable = tvm.compile(lowered, target=tvm.target.Target(TARGET.tvm_target()))
    asm = executable.mod.imports[0].inspect_source("asm")
    assert "vpdpbusd" in asm
    vm = relax.VirtualMachine(executable, tvm.cpu())
    wq, sw, offset = quantize_weight(w)
    for tokens in (1, 3, 7, 64):  # not multiples of the row tile
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        x[0] *= 50.0  # rows of different scales
        q, sx = quantize_rows(x)
        y = ((q.astype(np.int64) @ wq.astype(np.int64)) - offset) * sx[:, None].astype(np.float64) * sw
        ref = y + (y + extra if epilogue == "bias" else y / (1 + np.exp(-y)) * extra if epilogue == "silu" else y)
        out = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        # And W8A8's own error against float64 on the unquantized operands: about a percent.
        exact = x.astype(np.float64) @ w
        exact = exact + (exact + extra if epilogue == "bias" else exact / (1 + np.exp(-exact)) * extra
                         if epilogue == "silu" else exact)
        assert np.abs(out - exact).max() / np.abs(exact).max() < 0.03


@needs_vnni
def test_int8_model_is_verified_against_onnxruntime(tmp_path):
    lines = []
    package = compile_model(tiny.export(tmp_path / "tiny.onnx"), tmp_path / "tiny-int8.pgenpkg", weight_dtype="int8",
                            progress=lines.append)
    assert any(line.startswith("verified on cpu") for line in lines), lines
    from pgen_runtime import LLM, SamplingParams

    (out,) = LLM(package).generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 6


def test_int8_needs_vnni(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_dense, "has_vnni", lambda target: False)
    with pytest.raises(SpecError, match=r"weight_dtype='int8' needs AVX-512 VNNI .*--weight-dtype bfloat16"):
        compile_model(tiny.export(tmp_path / "tiny.onnx"), tmp_path / "x.pgenpkg", weight_dtype="int8")
    assert not (tmp_path / "x.pgenpkg").exists()
