"""`Graph`: an index over an ONNX graph (producers, consumers, constants, shapes) for the rewrite."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from pgen_runtime.errors import ModelImportError

# Ops on constants that exporters use to compute a softmax scale, e.g. GPT-2's
# 1 / sqrt(Cast(Gather(Shape(value), -1))): folded once the shapes they read are static.
_CONST_OPS = {
    "Identity": lambda g, n, a: a[0],
    "Cast": lambda g, n, a: a[0].astype(onnx.helper.tensor_dtype_to_np_dtype(g.attr(n, "to"))),
    "Sqrt": lambda g, n, a: np.sqrt(a[0]),
    "Reciprocal": lambda g, n, a: 1.0 / a[0],
    "Neg": lambda g, n, a: -a[0],
    "Mul": lambda g, n, a: a[0] * a[1],
    "Div": lambda g, n, a: a[0] / a[1] if a[0].dtype.kind == "f" else a[0] // a[1],
    "Add": lambda g, n, a: a[0] + a[1],
    "Sub": lambda g, n, a: a[0] - a[1],
    "Pow": lambda g, n, a: np.power(a[0], a[1]),
    "Gather": lambda g, n, a: np.take(a[0], a[1], axis=g.attr(n, "axis", 0)),
    "Squeeze": lambda g, n, a: a[0].reshape([d for d in a[0].shape if d != 1]) if len(a) == 1 else
    np.squeeze(a[0], tuple(int(x) for x in a[1].reshape(-1))),
    "Unsqueeze": lambda g, n, a: np.expand_dims(a[0], tuple(int(x) for x in a[1].reshape(-1))),
    "Slice": lambda g, n, a: a[0][slice(int(a[1][0]), int(a[2][0]))] if a[0].ndim == 1 and len(a) == 3 else None,
    "Concat": lambda g, n, a: np.concatenate(a, axis=g.attr(n, "axis", 0)),
    "ConstantOfShape": lambda g, n, a: _constant_of_shape(g, n, a[0]),
    # GPT-J's rotary `repeat_interleave` tiles its sin/cos table by shapes of Expand/Tile results.
    "Expand": lambda g, n, a: a[0] * np.ones([int(d) for d in a[1].reshape(-1)], a[0].dtype),
    "Tile": lambda g, n, a: np.tile(a[0], [int(r) for r in a[1].reshape(-1)]),
}


def _constant_of_shape(g, node, shape: np.ndarray) -> np.ndarray | None:
    """ConstantOfShape of a small static shape (GPT-2 builds its scale as full([], sqrt(D)))."""
    if shape.size and np.prod(shape) > 64:
        return None
    value = g.attr(node, "value")
    fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
    return np.full([int(d) for d in shape.reshape(-1)], fill)


class Graph:
    """Read-only lookups over `model.graph`, with shapes from ONNX shape inference."""

    def __init__(self, model: onnx.ModelProto) -> None:
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # shape inference is best effort: graph values without shapes stay unknown
            pass
        self.model = model
        self.graph = model.graph
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = {i.name: i for i in self.graph.input if i.name not in self.initializers}
        self.outputs = [o.name for o in self.graph.output]
        self._types = {v.name: v.type for v in [*self.graph.value_info, *self.graph.input, *self.graph.output]}
        self._consts: dict[str, np.ndarray | None] = {}
        # Memo tables of searches over this read-only graph (e.g. attention's `_reaches_qk`).
        self.memo: dict[str, dict] = {}

    def shape(self, name: str) -> list[int | str | None] | None:
        """Dims of a value (int, symbolic name, or None when unknown); None when the rank is unknown."""
        t = self._types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]

    def elem_type(self, name: str) -> int | None:
        t = self._types.get(name)
        return t.tensor_type.elem_type if t is not None else None

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant (initializer, Constant node, or small arithmetic on them), else None.

        Memoized: the rewrite asks it of every node, and arithmetic chains (the residual stream's
        Adds) would otherwise be walked again from each node on them.
        """
        if name in self.initializers:  # not memoized: weights would be held twice
            return numpy_helper.to_array(self.initializers[name])
        if name in self._consts:
            return self._consts[name]
        value = self._const(name)
        if value is None or value.size <= 4096:  # shapes, scales, masks' small tables; not weights
            self._consts[name] = value
        return value

    def _const(self, name: str) -> np.ndarray | None:
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            attr = node.attribute[0]
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name in ("value_float", "value_int"):
                return np.array(onnx.helper.get_attribute_value(attr))
            return None
        if node.op_type == "Shape":
            return self._static_shape(node)
        if node.op_type == "Gather" and (dims := self._shape_of(node.input[0])) is not None:
            index = self.const(node.input[1])  # one dim of a partly dynamic shape
            if index is not None and index.size == 1 and -len(dims) <= int(index.reshape(())) < len(dims):
                dim = dims[int(index.reshape(()))]
                return np.array(dim, np.int64).reshape(index.shape) if isinstance(dim, int) else None
        if node.op_type == "Slice" and (dims := self._shape_of(node.input[0])) is not None:
            bounds = [self.const(i) for i in node.input[1:3]]  # static dims of a partly dynamic shape
            axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else np.zeros(1)
            steps = self.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1)
            if all(b is not None and b.size == 1 for b in bounds) and axes is not None and axes.size == 1 \
                    and int(axes.reshape(-1)[0]) == 0 and steps is not None and steps.size == 1:
                bounds.append(steps)
                part = dims[slice(*(int(b.reshape(-1)[0]) for b in bounds))]
                return np.array(part, np.int64) if all(isinstance(d, int) for d in part) else None
        if node.op_type in ("ReduceMax", "ReduceMin") and len(node.input) == 1 and \
                (fill := self.producer.get(node.input[0])) is not None and fill.op_type == "ConstantOfShape":
            # Cohere's TorchScript repeat_interleave: max(full([n], repeats)) is `repeats` (n >= 1).
            value = self.attr(fill, "value")
            rank = len(self.vector(fill.input[0]) or [])
            if value is not None and rank:
                scalar = numpy_helper.to_array(value).reshape(-1)[0]
                return np.full([1] * rank if self.attr(node, "keepdims", 1) else [], scalar)
        if node.op_type in _CONST_OPS:
            args = []
            for i in filter(None, node.input):
                if (arg := self.const(i)) is None:
                    break
                args.append(arg)
            else:
                try:
                    value = _CONST_OPS[node.op_type](self, node, [np.asarray(a) for a in args])
                except (ValueError, IndexError, TypeError):
                    return None
                return None if value is None else np.asarray(value)
        return None

    def _static_shape(self, node: onnx.NodeProto) -> np.ndarray | None:
        dims = self._shape_of(node.output[0])
        return np.array(dims, np.int64) if dims is not None and all(isinstance(d, int) for d in dims) else None

    def _shape_of(self, name: str) -> list | None:
        """The dims (int, or None where dynamic) that `name` holds when a Shape node computes it."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Shape":
            return None
        shape = self.shape(node.input[0])
        if shape is None or not all(isinstance(d, int) for d in shape):
            # Shape inference leaves the dims of an Expand/Tile of constants unknown: compute them.
            source = node.input[0]
            if source in self.initializers:
                shape = list(self.initializers[source].dims)
            elif (producer := self.producer.get(source)) is not None and producer.op_type in _CONST_OPS and \
                    (value := self.const(source)) is not None:
                shape = list(value.shape)
        if shape is None:
            return None
        dims = shape[self.attr(node, "start", 0):self.attr(node, "end", len(shape))]
        return [d if isinstance(d, int) else None for d in dims]

    def vector(self, name: str) -> list[int | None] | None:
        """A 1-D int64 value elementwise, None where an element is computed at run time (a shape
        that exporters build as Concat of constants and Unsqueezed dims)."""
        value = self.const(name)
        if value is not None:
            return [int(v) for v in value.reshape(-1)] if value.ndim <= 1 else None
        node = self.producer.get(name)
        if node is not None and node.op_type == "Concat":
            parts = [self.vector(i) for i in node.input]
            return None if any(p is None for p in parts) else [v for p in parts for v in p]
        if node is not None and node.op_type == "Unsqueeze" and len(self.shape(node.input[0]) or [None]) == 0:
            return [None]
        shape = self.shape(name)
        return [None] * shape[0] if shape and len(shape) == 1 and isinstance(shape[0], int) else None

    def scalar(self, name: str) -> float | None:
        value = self.const(name)
        return float(value.reshape(())) if value is not None and value.size == 1 else None

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default


def describe(node: onnx.NodeProto) -> str:
    """How an error names a node: op type, name and first output."""
    name = f" {node.name!r}" if node.name else ""
    return f"{node.op_type}{name} (output {node.output[0]!r})"


def fail(node: onnx.NodeProto | None, why: str) -> ModelImportError:
    where = f"node {describe(node)}: " if node is not None else ""
    return ModelImportError(f"{where}{why}")
