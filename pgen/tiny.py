"""The default tiny model: a LLaMA-style decoder written as an ONNX graph with deterministic weights.

`pgen run` needs a model on a fresh machine without a hub and without torch, so the graph is built
with `onnx.helper` in the form torch.onnx (dynamo, opset 18) exports a decoder with past/present KV:
inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key/value`; outputs
`logits`, `present.N.key/value`; per layer RMSNorm, RoPE (cos/sin tables gathered by position),
grouped-query attention decomposed as MatMul -> scale -> mask Add -> Softmax -> MatMul with the
past `Concat` and the GQA repeat (Unsqueeze, Expand, Reshape) between them, and a SwiGLU MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EOS_TOKEN_ID = 2
NUM_SPECIAL_TOKENS = 3  # 0 pad, 1 bos, 2 eos; the byte-level tokenizer puts byte b at id b + 3
REVISION = 1  # part of the model name: bump it when the graph or the weights change


@dataclass(frozen=True, slots=True)
class TinyConfig:
    """Sizes of the tiny decoder; the default vocabulary holds the specials and the 256 bytes."""

    vocab: int = NUM_SPECIAL_TOKENS + 256
    hidden: int = 128
    layers: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 256
    max_positions: int = 4096
    seed: int = 0

    @property
    def name(self) -> str:
        c = self
        return f"tiny-llama-r{REVISION}-v{c.vocab}-h{c.hidden}-l{c.layers}-q{c.q_heads}-kv{c.kv_heads}-d{c.head_dim}-s{c.seed}"


class _Builder:
    """Collects nodes and initializers; every helper returns its output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, value, name: str | None = None) -> str:
        self._n += 1
        name = name or f"const_{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self._n}", **attrs))
        return out


def weights(c: TinyConfig = TinyConfig()) -> dict[str, np.ndarray]:
    """Deterministic weights: std 1/sqrt(fan_in) for projections, 0.5 for embeddings (spread logits)."""
    rng = np.random.default_rng(c.seed)

    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(c.hidden)).astype(np.float32)

    out = {"embed": (0.5 * rng.standard_normal((c.vocab, c.hidden))).astype(np.float32)}
    for i in range(c.layers):
        out |= {f"l{i}.norm1": norm(), f"l{i}.norm2": norm(),
                f"l{i}.q": w(c.hidden, c.q_heads * c.head_dim), f"l{i}.k": w(c.hidden, c.kv_heads * c.head_dim),
                f"l{i}.v": w(c.hidden, c.kv_heads * c.head_dim), f"l{i}.o": w(c.q_heads * c.head_dim, c.hidden),
                f"l{i}.gate": w(c.hidden, c.ffn), f"l{i}.up": w(c.hidden, c.ffn), f"l{i}.down": w(c.ffn, c.hidden)}
    # Random weights write random bytes; over a byte vocabulary a logit bias keeps the text readable:
    # printable ASCII, newline and EOS stay, the other ids (specials, control, non-ASCII bytes) sink.
    bias = np.zeros(c.vocab, np.float32)
    if c.vocab >= NUM_SPECIAL_TOKENS + 256:
        bias[:] = -10.0
        bias[[EOS_TOKEN_ID, NUM_SPECIAL_TOKENS + 10, *range(NUM_SPECIAL_TOKENS + 32, NUM_SPECIAL_TOKENS + 127)]] = 0.0
    return out | {"norm": norm(), "lm_head": w(c.hidden, c.vocab), "lm_bias": bias}


def _rms_norm(b: _Builder, x: str, weight: str) -> str:
    mean = b.op("ReduceMean", b.op("Mul", x, x), b.const(np.array([-1], np.int64)), keepdims=1)
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean, b.const(np.float32(1e-6)))))
    return b.op("Mul", b.op("Mul", x, inv), weight)


def _rope(b: _Builder, x: str, cos: str, sin: str, half: int) -> str:
    first = b.op("Slice", x, b.const(np.array([0], np.int64)), b.const(np.array([half], np.int64)),
                 b.const(np.array([-1], np.int64)))
    second = b.op("Slice", x, b.const(np.array([half], np.int64)), b.const(np.array([2 * half], np.int64)),
                  b.const(np.array([-1], np.int64)))
    rotated = b.op("Concat", b.op("Neg", second), first, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def _heads(b: _Builder, x: str, heads: int, head_dim: int) -> str:
    """[B, S, heads * D] -> [B, heads, S, D]."""
    shaped = b.op("Reshape", x, b.const(np.array([0, 0, heads, head_dim], np.int64)))
    return b.op("Transpose", shaped, perm=[0, 2, 1, 3])


def _repeat_kv(b: _Builder, x: str, c: TinyConfig) -> str:
    """[B, Hkv, T, D] -> [B, Hq, T, D], as HF's repeat_kv exports it."""
    group = c.q_heads // c.kv_heads
    expanded = b.op("Expand", b.op("Unsqueeze", x, b.const(np.array([2], np.int64))),
                    b.const(np.array([1, 1, group, 1, 1], np.int64)))
    return b.op("Reshape", expanded, b.const(np.array([0, c.q_heads, -1, c.head_dim], np.int64)))


def _mask(b: _Builder, attention_mask: str, input_ids: str, past: str) -> str:
    """Additive [B, 1, S, P+S] mask: causal over past + new tokens, and padding from attention_mask."""
    zero, one = b.const(np.int64(0)), b.const(np.int64(1))
    seq = b.op("Squeeze", b.op("Shape", input_ids, start=1, end=2), b.const(np.array([0], np.int64)))
    past_len = b.op("Squeeze", b.op("Shape", past, start=2, end=3), b.const(np.array([0], np.int64)))
    rows = b.op("Add", b.op("Range", zero, seq, one), past_len)
    cols = b.op("Range", zero, b.op("Add", past_len, seq), one)
    causal = b.op("LessOrEqual", b.op("Unsqueeze", cols, b.const(np.array([0], np.int64))),
                  b.op("Unsqueeze", rows, b.const(np.array([1], np.int64))))
    padding = b.op("Cast", b.op("Unsqueeze", attention_mask, b.const(np.array([1, 2], np.int64))), to=TensorProto.BOOL)
    keep = b.op("And", causal, padding)
    return b.op("Where", keep, b.const(np.float32(0.0)), b.const(np.float32(np.finfo(np.float32).min)))


def _layer(b: _Builder, i: int, x: str, cos: str, sin: str, mask: str, c: TinyConfig) -> tuple[str, str, str]:
    h = _rms_norm(b, x, f"l{i}.norm1")
    q = _rope(b, _heads(b, b.op("MatMul", h, f"l{i}.q"), c.q_heads, c.head_dim), cos, sin, c.head_dim // 2)
    k = _rope(b, _heads(b, b.op("MatMul", h, f"l{i}.k"), c.kv_heads, c.head_dim), cos, sin, c.head_dim // 2)
    v = _heads(b, b.op("MatMul", h, f"l{i}.v"), c.kv_heads, c.head_dim)
    present_k = b.op("Concat", f"past_key_values.{i}.key", k, axis=2)
    present_v = b.op("Concat", f"past_key_values.{i}.value", v, axis=2)
    keys = b.op("Transpose", _repeat_kv(b, present_k, c), perm=[0, 1, 3, 2])
    scores = b.op("Mul", b.op("MatMul", q, keys), b.const(np.float32(1.0 / np.sqrt(c.head_dim))))
    weights = b.op("Softmax", b.op("Add", scores, mask), axis=-1)
    attn = b.op("Transpose", b.op("MatMul", weights, _repeat_kv(b, present_v, c)), perm=[0, 2, 1, 3])
    attn = b.op("Reshape", attn, b.const(np.array([0, 0, c.q_heads * c.head_dim], np.int64)))
    x = b.op("Add", x, b.op("MatMul", attn, f"l{i}.o"))
    h = _rms_norm(b, x, f"l{i}.norm2")
    gate = b.op("MatMul", h, f"l{i}.gate")
    mlp = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), b.op("MatMul", h, f"l{i}.up"))
    return b.op("Add", x, b.op("MatMul", mlp, f"l{i}.down")), present_k, present_v


def build_onnx(config: TinyConfig = TinyConfig()) -> onnx.ModelProto:
    """The tiny decoder as an ONNX model (opset 18) with past/present KV and `eos_token_id` metadata."""
    c = config
    if c.q_heads % c.kv_heads or c.head_dim % 2:
        raise ValueError(f"{c}: q_heads must be a multiple of kv_heads and head_dim even")
    b = _Builder()
    for name, value in weights(c).items():
        b.const(value, name)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, c.head_dim, 2) / c.head_dim)
    angles = np.arange(c.max_positions)[:, None] * inv_freq[None]
    angles = np.concatenate([angles, angles], axis=-1)
    b.const(np.cos(angles).astype(np.float32), "rope_cos")
    b.const(np.sin(angles).astype(np.float32), "rope_sin")

    axis1 = b.const(np.array([1], np.int64))
    cos = b.op("Unsqueeze", b.op("Gather", "rope_cos", "position_ids"), axis1)
    sin = b.op("Unsqueeze", b.op("Gather", "rope_sin", "position_ids"), axis1)
    mask = _mask(b, "attention_mask", "input_ids", "past_key_values.0.key")
    x = b.op("Gather", "embed", "input_ids")
    presents = []
    for i in range(c.layers):
        x, k, v = _layer(b, i, x, cos, sin, mask, c)
        presents += [k, v]
    head = b.op("MatMul", _rms_norm(b, x, "norm"), "lm_head")
    b.nodes.append(helper.make_node("Add", [head, "lm_bias"], ["logits"], name="lm_bias"))
    for i, name in enumerate(presents):
        b.nodes.append(helper.make_node("Identity", [name], [f"present.{i // 2}.{('key', 'value')[i % 2]}"]))

    past = [helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT,
                                          ["batch", c.kv_heads, "past", c.head_dim])
            for i in range(c.layers) for kv in ("key", "value")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]), *past]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab])]
    outputs += [helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                              ["batch", c.kv_heads, "total", c.head_dim])
                for i in range(c.layers) for kv in ("key", "value")]
    graph = helper.make_graph(b.nodes, "tiny_llama", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    helper.set_model_props(model, {"eos_token_id": str(EOS_TOKEN_ID), "pgen.family": "llama"})
    onnx.checker.check_model(model)
    return model


def export(path: str | Path, config: TinyConfig = TinyConfig()) -> Path:
    """Write the tiny decoder to `path` (.onnx)."""
    path = Path(path)
    onnx.save(build_onnx(config), str(path))
    return path
