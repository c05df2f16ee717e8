"""The rewrite and the package: layer specs inferred from each export, errors for unsupported graphs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import EOS_TOKEN_ID, FAMILIES, VARIANTS
from pgen.cli import main
from pgen.onnx import rewrite
from pgen_runtime import ModelImportError

HEADS = {"llama": (4, 2), "gpt2": (4, 4)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_rewrite_infers_each_layer(built, family, variant):
    onnx_path, package, _ = built(family, variant)
    result = rewrite(onnx.load(str(onnx_path)), block_size=16)
    assert [(l.num_q_heads, l.num_kv_heads, l.head_dim) for l in result.layers] == [(*HEADS[family], 32)] * 2
    assert all(math.isclose(l.scale, 1 / math.sqrt(32), rel_tol=1e-6) for l in result.layers)
    ops = {n.op_type for n in result.model.graph.node}
    assert "Softmax" not in ops and "Attention" not in ops
    names = [i.name for i in result.model.graph.input]
    assert not any(n.startswith("past") or n == "attention_mask" for n in names)
    assert [o.name for o in result.model.graph.output] == ["logits"]
    model = json.loads((package / "manifest.json").read_text())["model"]
    assert (model["num_layers"], model["vocab_size"], model["eos_token_id"]) == (2, 256, EOS_TOKEN_ID)
    assert model["layers"][0]["num_q_heads"] == HEADS[family][0]
    assert [i["name"] for i in model["inputs"]] == names


def _graph(nodes, inputs, outputs, opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _t(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def test_attention_without_past_cache_is_rejected():
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"], name="qk"),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "v"], ["logits"], name="pv")]
    model = _graph(nodes, [_t("input_ids", [1, 4], TensorProto.INT64), _t("q", [1, 4, 8, 32]),
                           _t("k", [1, 4, 32, 8]), _t("v", [1, 4, 8, 32])], [_t("logits", [1, 4, 8, 32])])
    with pytest.raises(ModelImportError, match=r"no attention core .* reads a past_key_values input"):
        rewrite(model, 16)


def test_contrib_attention_is_rejected_by_name():
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v"], ["logits"], domain="com.microsoft",
                            name="gqa0", num_heads=4, kv_num_heads=2)
    model = _graph([node], [_t("input_ids", [1, 4], TensorProto.INT64), _t("q", [1, 4, 128]), _t("k", [1, 4, 64]),
                            _t("v", [1, 4, 64])], [_t("logits", [1, 4, 128])])
    with pytest.raises(ModelImportError, match="node GroupQueryAttention 'gqa0'.*not supported yet"):
        rewrite(model, 16)


def test_graph_without_attention_is_rejected():
    model = _graph([helper.make_node("Identity", ["input_ids"], ["logits"])],
                   [_t("input_ids", [1, 4], TensorProto.INT64)], [_t("logits", [1, 4], TensorProto.INT64)])
    with pytest.raises(ModelImportError, match="no attention core"):
        rewrite(model, 16)


def test_positions_from_past_length_are_rejected(built):
    """An export that derives positions from the past length cannot run on the paged cache."""
    onnx_path, _, _ = built("gpt2", "torchscript")
    model = onnx.load(str(onnx_path))
    graph = model.graph
    past = graph.input[3].name
    shape = helper.make_node("Shape", [past], ["past_len"], start=2, end=3, name="past_length")
    cast = helper.make_node("Cast", ["past_len"], ["past_len_f"], to=TensorProto.INT64, name="cast_past")
    add = helper.make_node("Add", ["position_ids", "past_len_f"], ["shifted_positions"], name="shift")
    for node in graph.node:
        node.input[:] = ["shifted_positions" if i == "position_ids" else i for i in node.input]
    graph.node.extend([shape, cast, add])
    sorted_nodes = [shape, cast, add] + [n for n in graph.node if n.name not in ("past_length", "cast_past", "shift")]
    del graph.node[:]
    graph.node.extend(sorted_nodes)
    with pytest.raises(ModelImportError, match=r"node Shape 'past_length'.*still reads"):
        rewrite(model, 16)


def test_cli_compile_model_and_tvm_free_runtime(built, tmp_path):
    onnx_path, _, reference = built("gpt2", "dynamo18")
    out = tmp_path / "gpt2.pgenpkg"
    assert main(["compile-model", str(onnx_path), "--target", "llvm", "--block-size", "8", "-o", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["spec"]["block_size"] == 8
    # The serving side never imports the TVM compiler (tvm_ffi itself may import torch if present).
    script = (
        "import sys\n"
        "from pgen_runtime import LLM, SamplingParams\n"
        f"out = LLM({str(out)!r}).generate([{reference_prompt()!r}], SamplingParams(max_tokens=8))\n"
        "assert not {'tvm', 'pgen'} & set(sys.modules)\n"
        "print(out[0].token_ids)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(reference[0][0][:8])


def test_cli_reports_import_errors(tmp_path, capsys):
    path = tmp_path / "plain.onnx"
    onnx.save(_graph([helper.make_node("Identity", ["input_ids"], ["logits"])],
                     [_t("input_ids", [1, 4], TensorProto.INT64)], [_t("logits", [1, 4], TensorProto.INT64)]), path)
    assert main(["compile-model", str(path), "-o", str(tmp_path / "x.pgenpkg")]) == 2
    assert "no attention core" in capsys.readouterr().err


def reference_prompt() -> list[int]:
    from builders import prompts

    return prompts()[0]


def test_logits_not_from_one_matmul_are_gathered_after_the_head(built, tmp_path):
    """An export whose logits come from another op (here a final scale) still serves the last rows."""
    from pgen.onnx import compile_model

    onnx_path, _, _ = built("llama", "dynamo18")
    model = onnx.load(str(onnx_path))
    head = next(n for n in model.graph.node if "logits" in n.output)
    head.output[:] = ["logits_unscaled"]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "logit_scale"))
    model.graph.node.append(helper.make_node("Mul", ["logits_unscaled", "logit_scale"], ["logits"], name="scale"))
    path = tmp_path / "scaled.onnx"
    onnx.save(model, path)
    package = compile_model(path, tmp_path / "scaled.pgenpkg", progress=lambda line: None)
    _assert_generates_like_onnxruntime(path, package)


def test_a_biased_head_runs_on_the_gathered_rows_only(built, tmp_path):
    """MatMul + a constant bias vector (GPT-style heads): the rows are gathered before the head."""
    from pgen.onnx import compile_model

    onnx_path, _, _ = built("llama", "dynamo18")
    model = onnx.load(str(onnx_path))
    head = next(n for n in model.graph.node if "logits" in n.output)
    head.output[:] = ["logits_nobias"]
    bias = np.random.default_rng(0).standard_normal(model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
    model.graph.initializer.append(onnx.numpy_helper.from_array(bias.astype(np.float32), "lm_bias"))
    model.graph.node.append(helper.make_node("Add", ["logits_nobias", "lm_bias"], ["logits"], name="bias"))
    path = tmp_path / "biased.onnx"
    onnx.save(model, path)
    rewritten = rewrite(onnx.load(str(path)), 16).model
    names = {n.name: n for n in rewritten.graph.node}
    assert "pgen_lm_head" in names and "pgen_lm_head_bias" in names
    assert names["pgen_lm_head"].input[0].endswith(".rows")  # the head reads the gathered rows
    package = compile_model(path, tmp_path / "biased.pgenpkg", progress=lambda line: None)
    _assert_generates_like_onnxruntime(path, package)


def _assert_generates_like_onnxruntime(onnx_path, package) -> None:
    from pgen_runtime.verify import ort_generate

    from pgen_runtime import LLM, SamplingParams

    prompt = reference_prompt()
    ref = ort_generate(onnx_path, prompt, 8, EOS_TOKEN_ID)
    tokens, logits = ref.tokens, ref.logits
    out = LLM(package).generate([prompt], SamplingParams(max_tokens=8, return_logits=True))[0]
    assert out.token_ids == tokens
    np.testing.assert_allclose(np.stack(out.logits), np.stack(logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_verify_names_the_first_layer_whose_cache_diverges(kv_dtype, tmp_path):
    # The package is checked against an export whose layer-1 V projection was changed: layer 0's
    # cached K/V agree (int8 codes too, within the tolerance), layer 1's V is named.
    from pgen.onnx import compile_model
    from pgen_runtime.verify import verify
    from pgen.tiny import TinyConfig, build_onnx
    from onnx import numpy_helper

    model = build_onnx(TinyConfig())
    onnx.save(model, tmp_path / "tiny.onnx")
    package = compile_model(tmp_path / "tiny.onnx", tmp_path / "tiny.pgenpkg", kv_dtype=kv_dtype, progress=lambda _: None)
    weight = next(i for i in model.graph.initializer if i.name == "l1.v")
    weight.CopyFrom(numpy_helper.from_array(3 * numpy_helper.to_array(weight), "l1.v"))
    onnx.save(model, tmp_path / "changed.onnx")
    with pytest.raises(ModelImportError, match="layer 1's cached V differs first at position 0, so layer 0's"):
        verify(package, tmp_path / "changed.onnx", progress=lambda _: None)
