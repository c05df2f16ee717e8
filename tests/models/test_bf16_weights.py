"""bf16 weights (`compile-model --weight-dtype bfloat16`): the rounding, the dense rule's two bf16
paths (vdpbf16ps pairs and widened fp32 FMAs) against numpy, and a model compiled and verified."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from tvm import relax

from pgen.onnx import compile_model
from pgen.onnx.weights import from_bf16_bits, to_bf16_bits
from pgen.schedules import cpu_dense
from pgen.target import parse_targets
from pgen_runtime.errors import SpecError

from dense_models import two_matmul_model  # tests/models/, on sys.path (conftest.py)

(TARGET,) = parse_targets("llvm")
HAS_BF16 = "avx512_bf16" in TARGET.info.features


def test_rounding_is_round_to_nearest_even_like_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100_000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, 1.00390625, 1.01171875],
                                 np.float32)]).astype(np.float32)
    expected = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(to_bf16_bits(x), expected)
    assert np.isnan(from_bf16_bits(to_bf16_bits(np.array([np.nan], np.float32)))).all()


@pytest.mark.parametrize("bf16_dot", [0, 1])
@pytest.mark.parametrize("k,n,epilogue", [(128, 128, "none"), (64, 259, "bias"), (96, 64, "silu")])
def test_bf16_dense_layers_match_numpy_on_rounded_operands(monkeypatch, bf16_dot, k, n, epilogue):
    if bf16_dot and not HAS_BF16:
        pytest.skip("this CPU has no avx512_bf16")
    default = cpu_dense.default
    monkeypatch.setattr(cpu_dense, "default", lambda target: {**default(target), "bf16_dot": bf16_dot})
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    extra = rng.standard_normal(n).astype(np.float32)
    lowered = two_matmul_model(k, n, epilogue, w, extra, "bfloat16", TARGET)
    dense = [f for gv, f in lowered.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and "dense_bf16" in gv.name_hint]
    assert dense and all(f.attrs.get("tirx.is_scheduled", False) for f in dense)
    rounded = [gv.name_hint for gv, f in lowered.functions.items() if "bf16_bits" in gv.name_hint]
    assert len(rounded) == 1, rounded  # x is rounded once for both matmuls
    executable = tvm.compile(lowered, target=tvm.target.Target(TARGET.tvm_target()))
    asm = executable.mod.imports[0].inspect_source("asm") if executable.mod.imports else ""
    if bf16_dot and asm:
        assert "vdpbf16ps" in asm
    vm = relax.VirtualMachine(executable, tvm.cpu())
    wr = from_bf16_bits(to_bf16_bits(w)).astype(np.float64)
    for tokens in (1, 3, 7, 64):  # not multiples of the row tile
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        y = from_bf16_bits(to_bf16_bits(x)).astype(np.float64) @ wr
        ref = y + (y + extra if epilogue == "bias" else y / (1 + np.exp(-y)) * extra if epilogue == "silu" else y)
        out = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_bf16_dot_is_refused_without_the_instruction():
    plain = dataclasses.replace(TARGET.info, features=frozenset({"avx512f"}))
    config = {**cpu_dense.default(plain), "bf16_dot": 1}
    assert "avx512_bf16" in cpu_dense.check(config, target=plain)
    assert cpu_dense.default(plain)["bf16_dot"] == 0


def test_a_tiny_model_with_bf16_weights_compiles_verifies_and_generates(tmp_path):
    from pgen.tiny import TinyConfig, export
    from pgen_runtime import LLM, SamplingParams
    from pgen_runtime.package import read_manifest

    onnx_path = export(tmp_path / "tiny.onnx", TinyConfig())
    with pytest.raises(SpecError, match="weight_dtype"):
        compile_model(onnx_path, tmp_path / "bad.pgenpkg", weight_dtype="float16", progress=lambda _: None)
    assert not (tmp_path / "bad.pgenpkg").exists()
    lines = []
    package = compile_model(onnx_path, tmp_path / "bf16.pgenpkg", weight_dtype="bfloat16", progress=lines.append)
    assert any(line.startswith("verified on cpu against onnxruntime") for line in lines)  # within WEIGHT_TOLERANCE
    _, manifest = read_manifest(package)
    assert manifest["model"]["weight_dtype"] == "bfloat16"
    outputs = LLM(package).generate([[5, 6, 7], [9] * 20], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [8, 8]
