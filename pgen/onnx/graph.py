"""`Graph`: an index over an ONNX graph (producers, consumers, constants, shapes) for the rewrite."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from pgen_runtime.errors import ModelImportError

# Elementwise ops on constants that exporters use to compute a softmax scale.
_CONST_OPS = {
    "Identity": lambda a: a[0],
    "Cast": lambda a: a[0],
    "Sqrt": lambda a: np.sqrt(a[0]),
    "Reciprocal": lambda a: 1.0 / a[0],
    "Mul": lambda a: a[0] * a[1],
    "Div": lambda a: a[0] / a[1],
}


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
        """The value of a constant (initializer, Constant node, or small arithmetic on them), else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
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
        if node.op_type in _CONST_OPS:
            args = [self.const(i) for i in node.input]
            if all(a is not None for a in args):
                return np.asarray(_CONST_OPS[node.op_type](args), dtype=np.float64)
        return None

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
