"""Tiny decoder models with deterministic random weights, exported to ONNX the way users export.

Two families, each with the HF/Optimum interface (`input_ids`, `attention_mask`, `position_ids`,
`past_key_values.N.key/value` in; `logits`, `present.N.key/value` out):

- `Llama`: RMSNorm, RoPE, grouped-query attention, SwiGLU, untied LM head.
- `Gpt2`: LayerNorm, learned positions, multi-head attention with a fused QKV projection, GELU
  (tanh), LM head tied to the token embedding.

`export(family, variant, path)` writes one of the `VARIANTS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

VARIANTS = ("dynamo18", "dynamo23", "torchscript")
FAMILIES = ("llama", "gpt2")
EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class Config:
    vocab: int = 256
    hidden: int = 128
    layers: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 256
    max_positions: int = 512


def _attend(q, k, v, mask, scale: float):
    """Attention with an additive mask, as HF's SDPA path writes it (GQA repeated before)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        b, h, t, d = k.shape
        k = k[:, :, None].expand(b, h, group, t, d).reshape(b, h * group, t, d)
        v = v[:, :, None].expand(b, h, group, t, d).reshape(b, h * group, t, d)
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _mask(attention_mask, seq: int, past: int, dtype):
    """[B, 1, S, P+S] additive mask: causal over past + new tokens, and padding from attention_mask."""
    total = past + seq
    rows = torch.arange(seq, device=attention_mask.device)[:, None] + past
    causal = torch.arange(total, device=attention_mask.device)[None, :] <= rows
    keep = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.where(keep, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaLayer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.norm1, self.norm2 = RMSNorm(c.hidden), RMSNorm(c.hidden)
        self.q = nn.Linear(c.hidden, c.q_heads * c.head_dim, bias=False)
        self.k = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.v = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.o = nn.Linear(c.q_heads * c.head_dim, c.hidden, bias=False)
        self.gate = nn.Linear(c.hidden, c.ffn, bias=False)
        self.up = nn.Linear(c.hidden, c.ffn, bias=False)
        self.down = nn.Linear(c.ffn, c.hidden, bias=False)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        c = self.c
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, c.q_heads, c.head_dim).transpose(1, 2)
        k = self.k(h).view(b, s, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(h).view(b, s, c.kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        a = _attend(q, k, v, mask, 1.0 / math.sqrt(c.head_dim))
        x = x + self.o(a.transpose(1, 2).reshape(b, s, c.q_heads * c.head_dim))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h)), k, v


class Llama(nn.Module):
    def __init__(self, c: Config = Config()) -> None:
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x = self.embed(input_ids)
        freqs = position_ids[:, None, :, None].float() * self.inv_freq[None, None, None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        mask = _mask(attention_mask, input_ids.shape[1], past[0].shape[2], x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.lm_head(self.norm(x)), *presents)


class Gpt2Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.ln1, self.ln2 = nn.LayerNorm(c.hidden), nn.LayerNorm(c.hidden)
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.fc = nn.Linear(c.hidden, c.ffn)
        self.out = nn.Linear(c.ffn, c.hidden)

    def forward(self, x, mask, past_k, past_v):
        c = self.c
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c.hidden, dim=2)
        q, k, v = (t.view(b, s, c.q_heads, c.head_dim).transpose(1, 2) for t in (q, k, v))
        k = torch.cat([past_k, k], dim=-2)
        v = torch.cat([past_v, v], dim=-2)
        a = _attend(q, k, v, mask, 1.0 / math.sqrt(c.head_dim))
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, c.hidden))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x)), approximate="tanh")), k, v


class Gpt2(nn.Module):
    def __init__(self, c: Config = Config(kv_heads=4)) -> None:
        super().__init__()
        self.c = c
        self.wte = nn.Embedding(c.vocab, c.hidden)
        self.wpe = nn.Embedding(c.max_positions, c.hidden)
        self.layers = nn.ModuleList(Gpt2Layer(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.hidden)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x = self.wte(input_ids) + self.wpe(position_ids)
        mask = _mask(attention_mask, input_ids.shape[1], past[0].shape[2], x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.ln_f(x) @ self.wte.weight.T, *presents)


def build(family: str, seed: int = 0) -> nn.Module:
    """A model of `family` with deterministic random weights (std 0.5, so logits are well spread)."""
    torch.manual_seed(seed)
    model = {"llama": Llama, "gpt2": Gpt2}[family]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 or "embed" in name or "wte" in name
                                               or "wpe" in name else 1.0 / math.sqrt(p.shape[1])))
    return model.eval()


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def example_inputs(c: Config, batch: int = 2, seq: int = 5, past: int = 3):
    kv_heads = c.kv_heads
    ids = torch.randint(0, c.vocab, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    kv = [torch.randn(batch, kv_heads, past, c.head_dim) for _ in range(2 * c.layers)]
    return (ids, mask, pos, *kv)


def export(family: str, variant: str, path: str | Path, seed: int = 0) -> Path:
    """Export the model of `family` with `variant` (one of VARIANTS) to `path`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; use one of {VARIANTS}")
    model = build(family, seed)
    c = model.c
    args = example_inputs(c)
    inputs, outputs = io_names(c.layers)
    path = Path(path)
    if variant == "torchscript":
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "seq"}}
        axes.update({n: {0: "batch", 2: "past"} for n in inputs[3:]})
        axes.update({n: {0: "batch", 2: "total"} for n in outputs[1:]})
        axes["logits"] = {0: "batch", 1: "seq"}
        torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    else:
        batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
        total = torch.export.Dim.AUTO
        shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
                  tuple({0: batch, 2: past} for _ in inputs[3:]))
        program = torch.onnx.export(model, args, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=shapes, opset_version=int(variant[-2:]), dynamo=True)
        program.save(str(path))
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"eos_token_id": str(EOS_TOKEN_ID), "pgen.family": family})
    onnx.save(proto, str(path))
    return path


MAX_TOKENS = 32


def prompts() -> list[list[int]]:
    """Four prompts of different lengths (1 to 4 blocks of 16) and two that share a 40-token prefix."""
    rng = np.random.default_rng(1)
    pick = lambda n: [int(t) for t in rng.integers(3, 256, n)]  # noqa: E731  # 0..2 are special ids
    shared = pick(40)
    return [pick(5), pick(17), pick(33), pick(60), shared + pick(1), shared + pick(2)]
