"""ONNX RotaryEmbedding (opset 23) through pgen's converter: equal to onnxruntime on small graphs.

Each graph is one RotaryEmbedding node with a dynamic sequence dim, run at two lengths: 4-D and
3-D X, halves and interleaved pairs, whole and partial rotation, caches gathered by position_ids
or given per token.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from pgen.onnx import relax_import
from pgen_runtime import ModelImportError

BATCH, HEADS, HEAD, MAX_POS = 2, 3, 8, 32


def _graph(layout: str, interleaved: int, rotary_dim: int, with_positions: bool) -> onnx.ModelProto:
    half = (rotary_dim or HEAD) // 2
    x_shape = ["batch", HEADS, "seq", HEAD] if layout == "4d" else ["batch", "seq", HEADS * HEAD]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if with_positions:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [MAX_POS, half]) for n in ("cos", "sin")]
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    else:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", half]) for n in ("cos", "sin")]
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rotary_dim}
    if layout == "3d":
        attrs["num_heads"] = HEADS
    node = helper.make_node("RotaryEmbedding", [i.name for i in inputs], ["y"], **attrs)
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)
    graph = helper.make_graph([node], "rotary", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _feeds(model: onnx.ModelProto, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for value in model.graph.input:
        dims = [BATCH if d.dim_param == "batch" else seq if d.dim_param == "seq" else d.dim_value
                for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.integers(0, MAX_POS, dims) if value.name == "position_ids" else \
            rng.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.mark.parametrize("with_positions", [True, False], ids=["position_ids", "per-token"])
@pytest.mark.parametrize("rotary_dim", [0, 4], ids=["whole", "partial"])
@pytest.mark.parametrize("interleaved", [0, 1], ids=["halves", "interleaved"])
@pytest.mark.parametrize("layout", ["4d", "3d"])
def test_rotary_embedding_matches_onnxruntime(layout, interleaved, rotary_dim, with_positions):
    model = _graph(layout, interleaved, rotary_dim, with_positions)
    onnx.checker.check_model(model, full_check=True)
    with relax_import._converter(None):  # no PagedAttention node: no kernels
        mod = from_onnx(model, keep_params_in_input=False)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for seq in (5, 1):  # the sequence dim stays dynamic: prefill, then decode
        feeds = _feeds(model, seq, rng)
        expected = session.run(None, feeds)[0]
        out = vm["main"](*(tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input)).numpy()
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_rotary_embedding_of_3d_x_without_num_heads_is_refused():
    model = _graph("3d", 0, 0, True)
    del model.graph.node[0].attribute[:]  # no num_heads: the heads of [batch, seq, hidden] are unknown
    with pytest.raises(ModelImportError, match="num_heads"), relax_import._converter(None):
        from_onnx(model, keep_params_in_input=False)
