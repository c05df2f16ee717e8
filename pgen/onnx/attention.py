"""Attention discovery: each layer's attention core in an export, in whatever form its exporter wrote it.

Every decoder export with past/present KV shares three anchors per layer: the past `Concat` of K
and of V (`Concat(past_key_values.N.key/value, new)` on the sequence axis), the Q·Kᵀ `MatMul` that
reads K and the P·V `MatMul` that reads V. Between them each exporter writes its own small steps.
The matcher starts at every MatMul whose right operand reaches a past Concat (P·V), walks back
through the attention weights to the Softmax, and from there back through the scores to the Q·Kᵀ
MatMul. Every step it may cross is one named pattern below, tried in order:

- `KV_STEPS` between a past Concat and a MatMul: data movement and GQA repeats (Reshape, Expand,
  Unsqueeze, Transpose, Tile, `repeat_kv` Gather), Casts, scalar scales;
- `WEIGHT_STEPS` between the Softmax and P·V: Casts and the all-masked-row guard
  `Where(IsNaN(p), 0, p)` that SDPA exports emit;
- `SCORE_STEPS` between Q·Kᵀ and the Softmax: scalar scales (constants or computed from static
  shapes), soft-capping `cap * Tanh(x / cap)`, additive masks, `Where(mask, scores, -inf)` masks,
  Casts.

A new export form is one more small function in the list it belongs to. The ONNX `Attention` op
(opset 23) is matched directly. Masks are dropped: the paged kernels apply causal masking and the
spec's sliding window, which `window` infers from the mask's construction (`position - window`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .graph import Graph, fail

_CONTRIB = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedMultiHeadAttention"}
DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
           onnx.TensorProto.BFLOAT16: "bfloat16"}
# A fill at or below this is a masked score (exporters write -inf or the dtype's lowest value).
_MASKED = -1e4


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
    masks: tuple[str, ...] = ()  # what the export masked the scores with (dropped by the rewrite)
    window: int | None = None  # the sliding window its mask builds (see `window`)


# ---- steps ------------------------------------------------------------------------------------
# Each step looks at the node that produces the operand being followed and returns what it reads
# on the path (or None when the pattern does not apply), and what it contributes.


@dataclass(frozen=True, slots=True)
class Step:
    source: str  # the node's input on the path
    scale: float = 1.0  # multiplies the scores
    mask: str | None = None  # the mask operand, dropped
    tanh: bool = False  # the node is the Tanh of a soft-cap


def _cast(g: Graph, node: onnx.NodeProto) -> Step | None:
    return Step(node.input[0]) if node.op_type in ("Cast", "Identity", "Dropout") else None


def _scalar_scale(g: Graph, node: onnx.NodeProto) -> Step | None:
    """x * c, c * x, x / c for a constant scalar c (folded from shapes where it is computed)."""
    factor, other = scalar_step(g, node)
    return Step(other, scale=factor) if factor is not None else None


def _nan_guard(g: Graph, node: onnx.NodeProto) -> Step | None:
    """Where(IsNaN(p), 0, p): SDPA's guard for rows whose every key is masked."""
    if node.op_type != "Where":
        return None
    cond = g.producer.get(node.input[0])
    if cond is None or cond.op_type != "IsNaN" or cond.input[0] != node.input[2] or g.scalar(node.input[1]) != 0:
        return None
    return Step(node.input[2])


def _mask_add(g: Graph, node: onnx.NodeProto) -> Step | None:
    """scores + mask: the operand that leads back to the Q·Kᵀ MatMul is the path."""
    if node.op_type != "Add":
        return None
    for i in (0, 1):
        if _reaches_qk(g, node.input[i]):
            return Step(node.input[i], mask=node.input[1 - i])
    return None


def _mask_where(g: Graph, node: onnx.NodeProto) -> Step | None:
    """Where(keep, scores, -inf) or Where(masked, -inf, scores) (GPT-2's causal bias)."""
    if node.op_type != "Where":
        return None
    for keep, fill in ((1, 2), (2, 1)):
        value = g.scalar(node.input[fill])
        if value is not None and value <= _MASKED and _reaches_qk(g, node.input[keep]):
            return Step(node.input[keep], mask=node.input[0])
    return None


def _softcap_tanh(g: Graph, node: onnx.NodeProto) -> Step | None:
    return Step(node.input[0], tanh=True) if node.op_type == "Tanh" else None


def _repeat_gather(g: Graph, node: onnx.NodeProto) -> Step | None:
    """Gather(kv, [0, 0, 1, 1, ...], axis=1): GQA's repeat of each KV head as an index."""
    if node.op_type != "Gather" or g.attr(node, "axis", 0) != 1:
        return None
    index = g.const(node.input[1])
    if index is None or index.ndim != 1 or np.any(np.diff(index) < 0):
        return None
    return Step(node.input[0])


def _move(g: Graph, node: onnx.NodeProto) -> Step | None:
    moves = ("Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Identity", "Tile", "Cast")
    return Step(node.input[0]) if node.op_type in moves else None


Pattern = Callable[[Graph, onnx.NodeProto], "Step | None"]
KV_STEPS: tuple[Pattern, ...] = (_move, _repeat_gather, _scalar_scale)
WEIGHT_STEPS: tuple[Pattern, ...] = (_cast, _nan_guard)
SCORE_STEPS: tuple[Pattern, ...] = (_cast, _scalar_scale, _softcap_tanh, _mask_add, _mask_where)


def _walk(g: Graph, name: str, steps: tuple[Pattern, ...], stop: Callable[[onnx.NodeProto], bool],
          what: str, core: onnx.NodeProto) -> tuple[onnx.NodeProto, list[Step]]:
    """Follow `name` back through `steps` to the first node where `stop` holds."""
    taken: list[Step] = []
    while True:
        node = g.producer.get(name)
        if node is None:
            raise fail(core, f"{what}: {name!r} is a graph input or constant")
        if stop(node):
            return node, taken
        step = next((s for s in (p(g, node) for p in steps) if s is not None), None)
        if step is None:
            raise fail(node, f"{what}: no pattern matches this {node.op_type} (add one to "
                             f"pgen.onnx.attention, or export with another attention implementation)")
        taken.append(step)
        name = step.source


def _reaches_qk(g: Graph, name: str) -> bool:
    """Whether `name` comes from a Q·Kᵀ MatMul through score steps (not a mask's own arithmetic).

    Memoized per graph: masks on masks (GPT-2's causal Where, then the padding Add) nest the search.
    """
    memo = g.memo.setdefault("reaches_qk", {})
    if name not in memo:
        memo[name] = False  # a cycle cannot reach it
        memo[name] = _search_qk(g, name)
    return memo[name]


def _search_qk(g: Graph, name: str) -> bool:
    for _ in range(16):
        node = g.producer.get(name)
        if node is None:
            return False
        if node.op_type == "MatMul":
            return past_concat(g, node.input[1]) is not None
        step = next((s for s in (p(g, node) for p in SCORE_STEPS) if s is not None), None)
        if step is None:
            return False
        name = step.source
    return False


def scalar_step(g: Graph, node: onnx.NodeProto) -> tuple[float | None, str]:
    """(factor, other input) when `node` multiplies or divides by a scalar constant, else (None, '')."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None, ""
    a, b = node.input
    if (s := g.scalar(b)) is not None and s != 0:
        return (s if node.op_type == "Mul" else 1.0 / s), a
    if node.op_type == "Mul" and (s := g.scalar(a)) is not None:
        return s, b
    return None, ""


def past_concat(g: Graph, name: str) -> tuple[onnx.NodeProto, float, bool] | None:
    """(past Concat, scale, transposed) that `name` reaches through KV steps, or None; `transposed`
    says a Transpose of the last two axes was crossed (Kᵀ: the operand is Q·Kᵀ's, not P·V's)."""
    scale, transposed = 1.0, False
    for _ in range(32):
        node = g.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Concat":
            ok = len(node.input) == 2 and node.input[0] in g.inputs and g.attr(node, "axis") in (2, -2)
            return (node, scale, transposed) if ok else None
        step = next((s for s in (p(g, node) for p in KV_STEPS) if s is not None), None)
        if step is None:
            return None
        if node.op_type == "Transpose":
            perm = list(g.attr(node, "perm", []))
            transposed ^= len(perm) >= 2 and perm[-2:] == [len(perm) - 1, len(perm) - 2]
        scale *= step.scale
        name = step.source
    return None


# ---- masks -------------------------------------------------------------------------------------


def window(g: Graph, masks: tuple[str, ...], limit: int = 4000) -> set[int]:
    """Sliding windows the masks' construction compares positions with: W where it computes
    `position - W` (Sub of an integer constant, or Add of its negation) that a comparison reads.

    Causal and padding masks compare positions with each other only; a windowed one (Mistral,
    Gemma-2's local layers) with `q_idx - W`.
    """
    found: set[int] = set()
    seen: set[str] = set()
    stack = list(masks)
    while stack and len(seen) < limit:
        name = stack.pop()
        if name in seen or name in g.initializers:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is None or node.op_type == "Shape":  # a shape carries no positions of the data it measures
            continue
        if node.op_type in ("Sub", "Add") and _compared(g, node.output[0]):
            for i in (0, 1):
                c = g.const(node.input[1 - i])
                if c is None or c.size != 1 or g.const(node.input[i]) is not None:
                    continue
                value = float(c.reshape(()))
                w = value if node.op_type == "Sub" and i == 0 else -value if node.op_type == "Add" else None
                if w is not None and w.is_integer() and w > 1:
                    found.add(int(w))
        stack.extend(i for i in node.input if i)
    return found


def _compared(g: Graph, name: str, depth: int = 0) -> bool:
    """Whether `name` feeds a comparison, through Casts, Unsqueezes and Reshapes."""
    for node in g.consumers.get(name, []):
        if node.op_type in ("Greater", "Less", "GreaterOrEqual", "LessOrEqual"):
            return True
        if node.op_type in ("Cast", "Unsqueeze", "Reshape", "Expand") and depth < 8 and \
                _compared(g, node.output[0], depth + 1):
            return True
    return False


# ---- layers -----------------------------------------------------------------------------------


def find_layers(g: Graph, sliding_window: int | None = None) -> list[Layer]:
    """Every attention core that reads a past-KV Concat, in graph order, with its sliding window:
    `sliding_window` for every layer where given (0: none), else what its mask builds.

    Raises:
        ModelImportError: a core does not read a past cache in a supported way, a mask builds
            more than one window, or the graph has no attention core at all.
    """
    layers = _cores(g)
    if sliding_window is not None:
        return [dataclasses.replace(layer, window=sliding_window or None) for layer in layers]
    out = []
    for layer in layers:
        found = window(g, layer.masks)
        if len(found) > 1:
            raise fail(layer.core, f"its mask compares positions with {sorted(found)}: more than one sliding "
                                   "window; pass the model's window with --sliding-window N (0: none)")
        out.append(dataclasses.replace(layer, window=found.pop() if found else None))
    return out


def _cores(g: Graph) -> list[Layer]:
    layers: list[Layer] = []
    for node in g.graph.node:
        if node.domain == "com.microsoft" and node.op_type in _CONTRIB:
            raise fail(node, f"com.microsoft {node.op_type} is not supported yet; export without ORT's fusions "
                             "(torch.onnx dynamo at opset 18 or 23, or the TorchScript exporter)")
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            layers.append(_attention_op(g, node, len(layers)))
        elif node.op_type == "MatMul" and (found := past_concat(g, node.input[1])) is not None and not found[2]:
            layers.append(_decomposed(g, node, len(layers)))  # P·V: V reaches it untransposed
    if not layers:
        raise fail(None, "no attention core (Softmax between two MatMuls, or an Attention op) reads a "
                         "past_key_values input; export the decoder with past/present KV (use_cache=True)")
    return layers


def _decomposed(g: Graph, pv: onnx.NodeProto, index: int) -> Layer:
    softmax, _ = _walk(g, pv.input[0], WEIGHT_STEPS, lambda n: n.op_type == "Softmax",
                       "between the Softmax and the P.V MatMul", pv)
    if g.attr(softmax, "axis", -1) not in (-1, 3):
        raise fail(softmax, f"Softmax over axis {g.attr(softmax, 'axis')}; attention normalizes over the last "
                            "(key) axis")
    qk, steps = _walk(g, softmax.input[0], SCORE_STEPS, lambda n: n.op_type == "MatMul",
                      "between the Q.K^T MatMul and the Softmax", softmax)
    found = past_concat(g, qk.input[1])
    if found is None:
        raise fail(qk, f"its K operand {qk.input[1]!r} does not come from Concat(past_key_values input, new K)")
    k_concat, k_scale, _ = found
    q_scale, q = _strip_scales(g, qk.input[0])
    scale, softcap = _scores(steps, softmax)
    v_concat = past_concat(g, pv.input[1])[0]
    d = _dim(g, k_concat.input[0], 3, qk)
    masks = tuple(s.mask for s in steps if s.mask is not None)
    return _layer(g, index, pv, q, k_concat.input[1], v_concat.input[1], pv.output[0], k_concat.input[0], d,
                  scale=scale * q_scale * k_scale, softcap=softcap, masks=masks)


def _scores(steps: list[Step], softmax: onnx.NodeProto) -> tuple[float, float | None]:
    """(scale, softcap) of the score steps, listed from the Softmax back to Q·Kᵀ.

    With a soft-cap the scores are `cap * tanh(pre * qk)`: the factors after the Tanh multiply to
    `cap`, those before it to `scale / cap`.
    """
    tanhs = [i for i, s in enumerate(steps) if s.tanh]
    if len(tanhs) > 1:
        raise fail(softmax, "two Tanh between the Q.K^T MatMul and the Softmax; a soft-cap has one")
    factors = [s.scale for s in steps]
    if not tanhs:
        return math.prod(factors), None
    cap, pre = math.prod(factors[:tanhs[0]]), math.prod(factors[tanhs[0] + 1:])
    if not cap > 0:
        raise fail(softmax, f"a Tanh soft-cap with cap {cap}; expected cap * tanh(x / cap) with cap > 0")
    return pre * cap, cap


def _strip_scales(g: Graph, name: str) -> tuple[float, str]:
    scale = 1.0
    while (node := g.producer.get(name)) is not None:
        factor, other = scalar_step(g, node)
        if factor is None:
            break
        scale, name = scale * factor, other
    return scale, name


def _attention_op(g: Graph, node: onnx.NodeProto, index: int) -> Layer:
    if len(node.input) > 4 and node.input[4]:
        raise fail(node, "Attention with past_key/past_value inputs is not supported yet; export with the "
                         "past Concat outside the op (torch.onnx dynamo does)")
    q = node.input[0]
    if len(g.shape(q) or []) != 4:
        raise fail(node, f"query {q!r} must be 4-D [batch, heads, seq, head_dim]; 3-D packed heads are not supported")
    found_k, found_v = past_concat(g, node.input[1]), past_concat(g, node.input[2])
    if found_k is None or found_v is None:
        raise fail(node, "its K/V operands do not come from Concat(past_key_values input, new K/V)")
    k_concat, v_concat = found_k[0], found_v[0]
    d = _dim(g, k_concat.input[0], 3, node)
    cap = g.attr(node, "softcap", 0.0)
    masks = (node.input[3],) if len(node.input) > 3 and node.input[3] else ()
    return _layer(g, index, node, q, k_concat.input[1], v_concat.input[1], node.output[0], k_concat.input[0], d,
                  scale=g.attr(node, "scale", 1.0 / math.sqrt(d)), softcap=cap or None, masks=masks)


def _layer(g: Graph, index, core, q, k, v, out, past_k, d, scale, softcap, masks) -> Layer:
    hq, hkv = _dim(g, q, 1, core), _dim(g, past_k, 1, core)
    dtype = DTYPES.get(g.elem_type(q))
    if dtype is None:
        raise fail(core, f"query {q!r} has ONNX element type {g.elem_type(q)}; use float32, float16 or bfloat16")
    if hq % hkv:
        raise fail(core, f"{hq} query heads are not a multiple of {hkv} KV heads")
    return Layer(index, q, k, v, out, core, hq, hkv, d, float(scale), softcap, dtype, masks)


def _dim(g: Graph, name: str, axis: int, core: onnx.NodeProto) -> int:
    dim = static_dim(g, name, axis)
    if dim is None:
        raise fail(core, f"cannot infer dim {axis} of {name!r} (shape {g.shape(name)}); export with static head "
                         "counts and head_dim")
    return dim


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Identity", "Where", "Sigmoid", "Tanh"}


def static_dim(g: Graph, name: str, axis: int, depth: int = 0) -> int | None:
    """Dim `axis` of a 4-D value, from shape inference or, where it lost the dim (TorchScript
    exports of RoPE often do), from the value's producers: elementwise ops, Transpose, Reshape to a
    constant shape, Concat and Slice on other axes."""
    shape = g.shape(name)
    if shape and len(shape) == 4 and isinstance(shape[axis], int) and shape[axis] > 0:
        return shape[axis]
    node = g.producer.get(name)
    if node is None or depth > 32:
        return None
    sources: list[tuple[str, int]] = []
    if node.op_type in _ELEMENTWISE or (node.op_type in ("Concat", "Slice") and _other_axis(g, node, axis)):
        sources = [(i, axis) for i in (node.input if node.op_type != "Slice" else node.input[:1]) if i]
    elif node.op_type == "RotaryEmbedding":  # opset 23 (torch dynamo): the output has X's shape
        sources = [(node.input[0], axis)]
    elif node.op_type == "Transpose":
        sources = [(node.input[0], list(g.attr(node, "perm", [0, 1, 2, 3]))[axis])]
    elif node.op_type == "Reshape":
        target = g.vector(node.input[1])
        if target is None or len(target) != 4:
            return None
        if target[axis] is not None and target[axis] > 0:
            return target[axis]
        if target[axis] == 0:
            sources = [(node.input[0], axis)]
        elif target[axis] == -1 and axis == 2 and isinstance(target[3], int) and target[3] > 0:
            # [b, s, H*D] -> [b, s, -1, D]: the heads are the input's last dim over D.
            width = (g.shape(node.input[0]) or [None])[-1]
            return width // target[3] if isinstance(width, int) and width % target[3] == 0 else None
    dims = {d for i, a in sources if (d := static_dim(g, i, a, depth + 1)) not in (None, 1)}
    return dims.pop() if len(dims) == 1 else None


def _other_axis(g: Graph, node: onnx.NodeProto, axis: int) -> bool:
    """A Concat or Slice that leaves `axis` of a 4-D value whole."""
    if node.op_type == "Concat":
        return g.attr(node, "axis") % 4 != axis
    axes = g.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    return axes is not None and all(int(a) % 4 != axis for a in axes.reshape(-1))
