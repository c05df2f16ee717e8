"""Rewrite a past/present KV decoder export so that every layer's attention reads the paged cache.

Per layer it finds the attention core and the past-KV `Concat` it reads (`pgen.onnx.attention`,
whose patterns name the export forms it accepts), and replaces both with one `pgen.PagedAttention`
node (see `PAGED_INPUTS`). The past / present / attention-mask plumbing dies with them and is
removed (dead-code elimination from the logits back), so no mask or position arithmetic of the
export runs on the flattened batch, whose shapes it was not written for.

The rewritten graph runs a flattened ragged batch of T tokens (B sequences):

    input_ids [T] int64, position_ids [T] int64 (when the export takes positions),
    kv_pool_<i> [num_blocks, 2, Hkv, block_size, D], block_tables [B, max_blocks] int32,
    slot_mapping [T] int32, q_indptr [B+1] int32, seq_lens [B] int32, logits_indices [B] int64,
    kv_splits [S] int32 (only its length counts: the step's split-KV factor, chosen by the runtime)
    -> logits [B, vocab]: the logits of row logits_indices[b] (the last new token of sequence b).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pgen_runtime.errors import SpecError
from pgen_runtime.spec import AttentionSpec

from .attention import DTYPES, Layer, find_layers
from .graph import Graph, fail

DOMAIN = "pgen"
OP = "PagedAttention"
PAGED_INPUTS = ("block_tables", "slot_mapping", "q_indptr", "seq_lens", "kv_splits")


@dataclass(frozen=True, slots=True)
class Rewritten:
    model: onnx.ModelProto
    layers: list[Layer]
    vocab_size: int
    has_positions: bool
    max_positions: int | None  # rows of the tables that position_ids index (rotary or learned)


def rewrite(model: onnx.ModelProto, block_size: int, sliding_window: int | None = None,
            kv_dtype: str | None = None) -> Rewritten:
    """Return a copy of `model` with every layer's attention on the paged cache (see module doc).

    Args:
        sliding_window: every layer's window (0: none); default: what each layer's mask builds.
        kv_dtype: the pools' kv_dtype (AttentionSpec); default: the layers' dtype.

    Raises:
        ModelImportError: the graph does not have the supported shape; the message names the node.
    """
    g = Graph(_batch_of_one(model))
    layers = find_layers(g, sliding_window)
    if "input_ids" not in g.inputs:
        raise fail(None, f"the graph has no 'input_ids' input (it has {sorted(g.inputs)})")
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
    nodes = [_past_shape(g, n) if n.op_type == "Shape" and n.input[0] in dead_inputs else _folded(g, n)
             for n in nodes]
    ranges = [n.output[0] for n in nodes if _is_cache_position(g, n, dead_inputs)]
    nodes = [_positions(g, n) if n.output[0] in ranges else n for n in nodes]
    live = _live(nodes, {"logits"})
    nodes = [n for n in nodes if id(n) in live]
    for node in nodes:
        used = dead_inputs.intersection(node.input)
        if used:
            raise fail(node, f"still reads {sorted(used)} after the rewrite; pgen serves exports whose past "
                             "KV feeds only the attention (pass position_ids as an input, not from the past length)")

    used = {i for n in nodes for i in n.input}
    has_positions = "position_ids" in used  # the export's own, or the cache positions' replacement
    inputs = [_input(n, TensorProto.INT64, ["num_tokens"]) for n in ("input_ids", "position_ids")
              if n == "input_ids" or has_positions]
    inputs += [_pool_input(layer, block_size, kv_dtype) for layer in layers]
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
    starts = ["position_ids", *ranges]
    return Rewritten(out, layers, vocab, has_positions, _max_positions(g, starts) if has_positions else None)


def _batch_of_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its batch dim (input_ids' first, where symbolic) fixed to 1 on every input.

    The paged graph runs one flattened batch: shapes that exporters compute from the batch size
    (GPT-J's and Cohere's rotary `repeat_interleave` tiles by Shape(position_ids)[0]) fold to
    constants instead of reaching TVM's frontend as shape tensors.
    """
    inputs = {i.name: i for i in model.graph.input}
    ids = inputs.get("input_ids")
    dims = ids.type.tensor_type.shape.dim if ids is not None and ids.type.tensor_type.HasField("shape") else []
    if not dims or not dims[0].dim_param:
        return model
    batch = dims[0].dim_param
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        shape = value.type.tensor_type.shape
        if value.type.tensor_type.HasField("shape") and shape.dim and shape.dim[0].dim_param == batch:
            shape.dim[0].Clear()
            shape.dim[0].dim_value = 1
    del out.graph.value_info[:]  # inferred again from the inputs
    return out


def _max_positions(g: Graph, starts: list[str]) -> int | None:
    """The fewest rows of a constant table that the positions (`starts`: position_ids and what
    `_positions` replaced) gather from (None: none does).

    A position past it has no rotary angle or learned embedding: the runtime caps a sequence's
    length there, rather than let the model read past the table.
    """
    rows, stack, seen = [], list(starts), set()
    while stack:
        name = stack.pop()
        for node in g.consumers.get(name, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Gather" and node.input[1] == name and g.attr(node, "axis", 0) == 0:
                table = g.shape(node.input[0]) or []
                if table and isinstance(table[0], int):
                    rows.append(table[0])
            elif node.op_type in ("Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity", "Flatten"):
                stack.append(node.output[0])
    return min(rows) if rows else None


def _paged_node(layer: Layer) -> onnx.NodeProto:
    attrs = dict(num_q_heads=layer.num_q_heads, num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim,
                 scale=layer.scale, layer=layer.index)
    if layer.softcap:
        attrs["softcap"] = layer.softcap
    if layer.window:
        attrs["sliding_window"] = layer.window
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


def _folded(g: Graph, node: onnx.NodeProto) -> onnx.NodeProto:
    """A node whose (small) value follows from constants and static dims, as a Constant.

    TorchScript exports compute shapes at run time from static dims (`chunk`'s split point as
    Shape(x)[-1] / 2, `expand`'s [B, -1, 1] and its own Shape): folded, Relax sees literal shapes
    and keeps every dim it can know (TVM's frontend cannot reshape by a computed shape tensor).
    """
    if node.op_type == "Constant" or len(node.output) != 1:
        return node
    value = g.const(node.output[0])
    if value is None or value.size > 64 or value.dtype.kind not in "iub":
        return node
    return helper.make_node("Constant", [], node.output, name=node.name,
                            value=numpy_helper.from_array(value, node.output[0]))


def _is_cache_position(g: Graph, node: onnx.NodeProto, past: set[str]) -> bool:
    """Range(past_len, past_len + new, 1) with past_len read from a past input's sequence dim: the
    positions of the new tokens (transformers' `cache_position`), in exports without position_ids."""
    if node.op_type != "Range" or g.scalar(node.input[2]) != 1:
        return False
    name = node.input[0]
    for _ in range(8):
        producer = g.producer.get(name)
        if producer is None:
            return False
        if producer.op_type == "Gather" and g.scalar(producer.input[1]) in (2, -2):
            shape = g.producer.get(producer.input[0])
            return shape is not None and shape.op_type == "Shape" and shape.input[0] in past and \
                g.attr(shape, "start", 0) == 0 and len(g.shape(shape.input[0]) or []) == 4
        if producer.op_type not in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape"):
            return False
        name = producer.input[0]
    return False


def _positions(g: Graph, node: onnx.NodeProto) -> onnx.NodeProto:
    """The cache-position Range as the paged step's position_ids [T] (each token's own position)."""
    elem = g.elem_type(node.output[0]) or TensorProto.INT64
    return helper.make_node("Cast", ["position_ids"], node.output, name=node.name, to=elem)


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


def _pool_input(layer: Layer, block_size: int, kv_dtype: str | None) -> onnx.ValueInfoProto:
    """The layer's pool input: its spec's pool shape and storage dtype (codes for int8/fp8 KV)."""
    try:
        spec = AttentionSpec(layer.num_q_heads, layer.num_kv_heads, layer.head_dim, block_size, layer.dtype,
                             kv_dtype=kv_dtype)
    except SpecError as err:
        raise fail(layer.core, f"layer {layer.index}: {err}") from None
    elem = {v: k for k, v in DTYPES.items()}.get(spec.kv_storage_dtype) or helper.np_dtype_to_tensor_dtype(
        np.dtype(spec.kv_storage_dtype))
    return helper.make_tensor_value_info(f"kv_pool_{layer.index}", elem, ["num_blocks", *spec.pool_shape()[1:]])
