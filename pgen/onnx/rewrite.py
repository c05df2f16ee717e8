"""Rewrite a past/present KV decoder export so that every layer's attention reads the paged cache.

Per layer it finds the attention core and the past-KV `Concat` it reads, and replaces both with one
`pgen.PagedAttention` node (see `PAGED_INPUTS`). The past / present / attention-mask plumbing dies
with them and is removed. Supported cores:

- decomposed: `MatMul(q*s, K'*s) [*s] + mask -> Softmax -> MatMul(., V')` (torch dynamo opset 18,
  the TorchScript exporter), where K', V' reach the past `Concat` through Reshape, Transpose,
  Expand, Unsqueeze (GQA repeat) and scalar Mul/Div;
- the ONNX `Attention` op (opset 23), reading the concatenated K/V or taking past_key/past_value.

The rewritten graph runs a flattened ragged batch of T tokens (B sequences):

    input_ids [T] int64, position_ids [T] int64 (when the export takes positions),
    kv_pool_<i> [num_blocks, 2, Hkv, block_size, D], block_tables [B, max_blocks] int32,
    slot_mapping [T] int32, q_indptr [B+1] int32, seq_lens [B] int32, logits_indices [B] int64,
    kv_splits [S] int32 (only its length counts: the step's split-KV factor, chosen by the runtime)
    -> logits [B, vocab]: the logits of row logits_indices[b] (the last new token of sequence b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from .graph import Graph, fail

DOMAIN = "pgen"
OP = "PagedAttention"
PAGED_INPUTS = ("block_tables", "slot_mapping", "q_indptr", "seq_lens", "kv_splits")
# Ops between a past Concat and the attention core that only move or repeat data (GQA repeat_kv).
_MOVES = {"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Identity"}
_CONTRIB = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedMultiHeadAttention"}
_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


@dataclass(frozen=True, slots=True)
class Layer:
    """One attention layer as found in the export."""

    index: int
    q: str
    k: str
    v: str
    out: str
    core: onnx.NodeProto  # the node whose output `out` becomes the paged node's output
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    softcap: float | None
    dtype: str


@dataclass(frozen=True, slots=True)
class Rewritten:
    model: onnx.ModelProto
    layers: list[Layer]
    vocab_size: int
    has_positions: bool


def find_layers(g: Graph) -> list[Layer]:
    """Every attention core that reads a past-KV Concat, in graph order.

    Raises:
        ModelImportError: a Softmax/Attention core does not read a past cache in a supported way,
            or the graph has no such core at all.
    """
    layers: list[Layer] = []
    for node in g.graph.node:
        if node.domain == "com.microsoft" and node.op_type in _CONTRIB:
            raise fail(node, f"com.microsoft {node.op_type} is not supported yet; export without ORT's fusions "
                             "(torch.onnx dynamo at opset 18 or 23, or the TorchScript exporter)")
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            layers.append(_attention_op(g, node, len(layers)))
        elif node.op_type == "Softmax":
            layers.append(_decomposed(g, node, len(layers)))
    if not layers:
        raise fail(None, "no attention core (Softmax between two MatMuls, or an Attention op) reads a "
                         "past_key_values input; export the decoder with past/present KV (use_cache=True)")
    return layers


def _attention_op(g: Graph, node: onnx.NodeProto, index: int) -> Layer:
    if len(node.input) > 4 and node.input[4]:
        raise fail(node, "Attention with past_key/past_value inputs is not supported yet; export with the "
                         "past Concat outside the op (torch.onnx dynamo does)")
    q = node.input[0]
    if len(g.shape(q) or []) != 4:
        raise fail(node, f"query {q!r} must be 4-D [batch, heads, seq, head_dim]; 3-D packed heads are not supported")
    k, past_k = _past_concat(g, node.input[1], node)
    v, _ = _past_concat(g, node.input[2], node)
    d = _dim(g, past_k, 3, node)
    cap = g.attr(node, "softcap", 0.0)
    return _layer(g, index, node, q, k, v, node.output[0], past_k, d,
                  scale=g.attr(node, "scale", 1.0 / math.sqrt(d)), softcap=cap or None)


def _decomposed(g: Graph, softmax: onnx.NodeProto, index: int) -> Layer:
    axis = g.attr(softmax, "axis", -1)
    if axis not in (-1, 3):
        raise fail(softmax, f"Softmax over axis {axis}; attention normalizes over the last (key) axis")
    scale, name = 1.0, softmax.input[0]
    while True:  # back from the Softmax: mask Adds and scalar scales, up to the QK MatMul
        node = g.producer.get(name)
        if node is None:
            raise fail(softmax, "Softmax input does not come from a Q.K^T MatMul")
        if node.op_type == "MatMul":
            break
        if node.op_type == "Add":
            name = next((i for i in node.input if _leads_to_matmul(g, i)), None)
            if name is None:
                raise fail(node, "neither operand of the mask Add comes from the Q.K^T MatMul")
            continue
        factor, name = _scalar_step(g, node)
        if factor is None:
            raise fail(node, "unsupported op between the Q.K^T MatMul and the Softmax (expected a mask Add "
                             "or a scalar Mul/Div)")
        scale *= factor
    qk = node
    q_scale, q = _strip_scales(g, qk.input[0])
    k, past_k = _past_concat(g, qk.input[1], qk)
    consumers = g.consumers[softmax.output[0]]
    if len(consumers) != 1 or consumers[0].op_type != "MatMul" or consumers[0].input[0] != softmax.output[0]:
        raise fail(softmax, "the attention weights must feed exactly one MatMul with V")
    pv = consumers[0]
    v, _ = _past_concat(g, pv.input[1], pv)
    k_scale = _strip_scales(g, qk.input[1], through_moves=True)[0]
    d = _dim(g, past_k, 3, qk)
    return _layer(g, index, pv, q, k, v, pv.output[0], past_k, d, scale=scale * q_scale * k_scale, softcap=None)


def _layer(g: Graph, index, core, q, k, v, out, past_k, d, scale, softcap) -> Layer:
    hq, hkv = _dim(g, q, 1, core), _dim(g, past_k, 1, core)
    dtype = _DTYPES.get(g.elem_type(q))
    if dtype is None:
        raise fail(core, f"query {q!r} has ONNX element type {g.elem_type(q)}; use float32, float16 or bfloat16")
    if hq % hkv:
        raise fail(core, f"{hq} query heads are not a multiple of {hkv} KV heads")
    return Layer(index, q, k, v, out, core, hq, hkv, d, float(scale), softcap, dtype)


def _leads_to_matmul(g: Graph, name: str) -> bool:
    while True:
        node = g.producer.get(name)
        if node is None:
            return False
        if node.op_type == "MatMul":
            return True
        factor, name = _scalar_step(g, node)
        if factor is None:
            return False


def _scalar_step(g: Graph, node: onnx.NodeProto) -> tuple[float | None, str]:
    """(factor, other input) when `node` multiplies or divides by a scalar constant, else (None, '')."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None, ""
    a, b = node.input
    if (s := g.scalar(b)) is not None:
        return (s if node.op_type == "Mul" else 1.0 / s), a
    if node.op_type == "Mul" and (s := g.scalar(a)) is not None:
        return s, b
    return None, ""


def _strip_scales(g: Graph, name: str, through_moves: bool = False) -> tuple[float, str]:
    scale = 1.0
    while (node := g.producer.get(name)) is not None:
        if through_moves and node.op_type in _MOVES:
            name = node.input[0]
            continue
        factor, other = _scalar_step(g, node)
        if factor is None:
            break
        scale, name = scale * factor, other
    return scale, name


def _past_concat(g: Graph, name: str, core: onnx.NodeProto) -> tuple[str, str]:
    """(new K or V tensor, past input) of the Concat that `name` reaches through data movement."""
    start = name
    while (node := g.producer.get(name)) is not None and node.op_type != "Concat":
        factor, other = _scalar_step(g, node)
        if node.op_type in _MOVES:
            name = node.input[0]
        elif factor is not None:
            name = other
        else:
            break
    if node is None or node.op_type != "Concat" or len(node.input) != 2 or node.input[0] not in g.inputs:
        raise fail(core, f"its K/V operand {start!r} does not come from Concat(past_key_values input, new K/V)")
    if g.attr(node, "axis") not in (2, -2):
        raise fail(node, f"the past Concat joins axis {g.attr(node, 'axis')}; expected the sequence axis 2 "
                         "of [batch, kv_heads, seq, head_dim]")
    return node.input[1], node.input[0]


def _dim(g: Graph, name: str, axis: int, core: onnx.NodeProto) -> int:
    shape = g.shape(name)
    if not shape or len(shape) != 4 or not isinstance(shape[axis], int) or shape[axis] <= 0:
        raise fail(core, f"cannot infer dim {axis} of {name!r} (shape {shape}); export with static head counts "
                         "and head_dim")
    return shape[axis]


def rewrite(model: onnx.ModelProto, block_size: int) -> Rewritten:
    """Return a copy of `model` with every layer's attention on the paged cache (see module doc).

    Raises:
        ModelImportError: the graph does not have the supported shape; the message names the node.
    """
    g = Graph(model)
    layers = find_layers(g)
    if "input_ids" not in g.inputs:
        raise fail(None, f"the graph has no 'input_ids' input (it has {sorted(g.inputs)})")
    has_positions = "position_ids" in g.inputs
    logits = "logits" if "logits" in g.outputs else g.outputs[0]
    vocab = (g.shape(logits) or [None])[-1]
    if not isinstance(vocab, int):
        raise fail(g.producer.get(logits), f"cannot infer the vocabulary size from {logits!r}")

    cores = {id(layer.core): layer for layer in layers}
    nodes = [n for name in ("input_ids", "position_ids") if name in g.inputs for n in _unsqueeze(name)]
    renames = {n.input[0]: n.output[0] for n in nodes if n.op_type == "Unsqueeze"}
    renames[logits] = f"{logits}.all"  # the export's logits [1, T, vocab]; "logits" becomes [B, vocab]
    for node in g.graph.node:
        layer = cores.get(id(node))
        node = _paged_node(layer) if layer is not None else _renamed(node, renames)
        nodes.append(node)
    nodes += _gather_logits(g, renames[logits], logits)

    dead_inputs = set(g.inputs) - {"input_ids", "position_ids"}
    nodes = [_past_shape(g, n) if n.op_type == "Shape" and n.input[0] in dead_inputs else n for n in nodes]
    live = _live(nodes, {"logits"})
    nodes = [n for n in nodes if id(n) in live]
    for node in nodes:
        used = dead_inputs.intersection(node.input)
        if used:
            raise fail(node, f"still reads {sorted(used)} after the rewrite; pgen serves exports whose past "
                             "KV feeds only the attention (pass position_ids as an input, not from the past length)")

    used = {i for n in nodes for i in n.input}
    inputs = [_input(n, TensorProto.INT64, ["num_tokens"]) for n in ("input_ids", "position_ids")
              if n in g.inputs and n in used]
    inputs += [_pool_input(layer, block_size) for layer in layers]
    inputs += [_input("block_tables", TensorProto.INT32, ["num_seqs", "max_blocks"]),
               _input("slot_mapping", TensorProto.INT32, ["num_tokens"]),
               _input("q_indptr", TensorProto.INT32, ["num_seqs_plus_one"]),
               _input("seq_lens", TensorProto.INT32, ["num_seqs"]),
               _input("logits_indices", TensorProto.INT64, ["num_seqs"]),
               _input("kv_splits", TensorProto.INT32, ["num_kv_splits"])]
    elem = g.elem_type(logits) or TensorProto.FLOAT
    graph = helper.make_graph(nodes, g.graph.name or "pgen", inputs,
                              [helper.make_tensor_value_info("logits", elem, ["num_seqs", vocab])],
                              initializer=[t for t in g.graph.initializer if t.name in used])
    opsets = [o for o in model.opset_import if o.domain != DOMAIN] + [helper.make_opsetid(DOMAIN, 1)]
    out = helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    out.metadata_props.extend(model.metadata_props)
    return Rewritten(out, layers, vocab, has_positions)


def _paged_node(layer: Layer) -> onnx.NodeProto:
    attrs = dict(num_q_heads=layer.num_q_heads, num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim,
                 scale=layer.scale, layer=layer.index)
    if layer.softcap:
        attrs["softcap"] = layer.softcap
    return helper.make_node(OP, [layer.q, layer.k, layer.v, f"kv_pool_{layer.index}", *PAGED_INPUTS],
                            [layer.out], name=f"paged_attention_{layer.index}", domain=DOMAIN, **attrs)


def _unsqueeze(name: str) -> list[onnx.NodeProto]:
    """[T] -> [1, T]: the export's batch axis holds the one flattened ragged batch."""
    axes = helper.make_node("Constant", [], [f"{name}.axes"],
                            value=helper.make_tensor(f"{name}.axes", TensorProto.INT64, [1], [0]))
    return [axes, helper.make_node("Unsqueeze", [name, axes.output[0]], [f"{name}.batched"], name=f"{name}.batched")]


def _past_shape(g: Graph, node: onnx.NodeProto) -> onnx.NodeProto:
    """A Shape of a removed past input that reads only its batch or static dims, from what remains.

    Exporters take the batch size from any input that has it (torch dynamo often picks a past
    input); the flattened batch is 1, so the batch dim becomes the Shape of the batched input_ids.
    """
    shape = g.shape(node.input[0]) or []
    start, end = g.attr(node, "start", 0), g.attr(node, "end", len(shape))
    dims = list(range(len(shape)))[start:end]
    if dims == [0]:
        return helper.make_node("Shape", ["input_ids.batched"], node.output, name=node.name, start=0, end=1)
    if dims and all(isinstance(shape[d], int) for d in dims):
        value = helper.make_tensor(node.output[0], TensorProto.INT64, [len(dims)], [shape[d] for d in dims])
        return helper.make_node("Constant", [], node.output, name=node.name, value=value)
    return node  # reads the past length: reported as a live use of a removed input


def _renamed(node: onnx.NodeProto, renames: dict[str, str]) -> onnx.NodeProto:
    if not renames.keys() & {*node.input, *node.output}:
        return node
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.input[:] = [renames.get(i, i) for i in node.input]
    new.output[:] = [renames.get(o, o) for o in node.output]
    return new


def _gather_logits(g: Graph, logits: str, source: str) -> list[onnx.NodeProto]:
    """Gather the rows of `logits_indices` before the LM head when it is one MatMul (plus a constant
    bias), else after it: a prefill step then runs the head on one row per sequence, not on all.

    Args:
        logits: the export's logits [1, T, vocab] as renamed in the rewritten graph.
        source: its name in the export (for the producer and shapes).
    """
    head, bias = g.producer.get(source), None
    if head is not None and head.op_type == "Add":
        producers = [g.producer.get(i) for i in head.input]
        for k in (0, 1):
            other = g.const(head.input[1 - k])
            if producers[k] is not None and producers[k].op_type == "MatMul" and other is not None and other.ndim <= 1:
                head, bias = producers[k], head.input[1 - k]
                break
    if head is not None and head.op_type == "MatMul" and len(g.shape(head.input[0]) or []) == 3:
        hidden = f"{head.input[0]}.rows"
        rows = f"{logits}.rows"
        nodes = [helper.make_node("Gather", [head.input[0], "logits_indices"], [hidden], axis=1, name="pgen_rows"),
                 helper.make_node("MatMul", [hidden, head.input[1]], [rows if bias is None else f"{rows}.mm"],
                                  name="pgen_lm_head")]
        if bias is not None:
            nodes.append(helper.make_node("Add", [f"{rows}.mm", bias], [rows], name="pgen_lm_head_bias"))
    else:
        rows = f"{logits}.rows"
        nodes = [helper.make_node("Gather", [logits, "logits_indices"], [rows], axis=1, name="pgen_rows")]
    axes = helper.make_node("Constant", [], ["logits.axes"],
                            value=helper.make_tensor("logits.axes", TensorProto.INT64, [1], [0]))
    return [*nodes, axes, helper.make_node("Squeeze", [rows, "logits.axes"], ["logits"], name="pgen_logits")]


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> set[int]:
    producer = {o: n for n in nodes for o in n.output}
    live, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(i for i in node.input if i)
    return live


def _input(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def _pool_input(layer: Layer, block_size: int) -> onnx.ValueInfoProto:
    elem = {v: k for k, v in _DTYPES.items()}[layer.dtype]
    return helper.make_tensor_value_info(f"kv_pool_{layer.index}", elem,
                                         ["num_blocks", 2, layer.num_kv_heads, block_size, layer.head_dim])
