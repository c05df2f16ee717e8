"""`AttentionSpec`: the declarative description every pgen kernel and package is made from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError

DTYPES = ("float32", "float16", "bfloat16")
# Quantized KV dtypes: the storage dtype of their codes and the largest code magnitude.
QUANTIZED_KV = {"int8": ("int8", 127.0), "fp8_e4m3": ("uint8", 448.0)}
KV_DTYPES = DTYPES + tuple(QUANTIZED_KV)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "fp8_e4m3": 1}
_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int8": "i8", "fp8_e4m3": "f8e4m3"}
# NOTE: the KV pool of one layer is [num_blocks, 2, num_kv_heads, block_size, head_dim]; index 0 of
# the second axis holds K, 1 holds V. The layout is part of the spec, so a package records it and a
# loader refuses a pool of any other layout.
KV_LAYOUT = "NB,2,HKV,BS,D"
# NOTE: a quantized pool (kv_dtype int8 or fp8_e4m3) is [num_blocks, 2, num_kv_heads, block_size + S,
# head_dim] of one-byte codes: rows 0..block_size-1 hold token codes, and the S = ceil(4 * block_size
# / head_dim) rows after them hold the block's float32 scales, one per (token, head), little-endian
# from the first byte of row block_size (value = code * scale). The scales stay with their block, so
# block copies and swaps move them without knowing of them; decode reads 4 bytes per row beside it.
KV_LAYOUT_QUANTIZED = "NB,2,HKV,BS+S,D;S=ceil(4*BS/D);scales=f32[BS]@row BS"
# NOTE: an int8 pool has the same slabs, but the BS x D code bytes of each (block, K/V, head) slab are
# stored 4-interleaved for integer dot products (AVX-512 VNNI's vpdpbusd sums 4 adjacent byte
# products per 32-bit lane): K as [D/4][BS][4] (byte j of row t's dims 4i..4i+3 at (i * BS + t) * 4
# + j: one 64-byte load holds 16 tokens' next 4 dims, so scores come out one lane per token), V as
# [BS/Q][D][Q] with Q = min(4, BS) (token Q * i + j of dim x at (i * D + x) * Q + j: one load holds
# 16 dims' next 4 tokens, so P.V sums 4 tokens per lane). kv_quant.pack_codes / unpack_codes convert.
KV_LAYOUT_INT8 = ("NB,2,HKV,BS+S,D;S=ceil(4*BS/D);scales=f32[BS]@row BS;"
                  "codes K=[D/4][BS][4],V=[BS/Q][D][Q],Q=min(4,BS)")
# Block id 0 is reserved: block tables are padded with it and the manager never hands it out.
NULL_BLOCK_ID = 0


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """One paged-attention variant.

    Args:
        num_q_heads: query heads.
        num_kv_heads: key/value heads; must divide `num_q_heads` (GQA group = q / kv).
        head_dim: 32..256, a multiple of 8.
        block_size: tokens per KV block, a power of two in 1..256.
        dtype: dtype of queries and outputs: float32, float16 or bfloat16.
        kv_dtype: dtype of the KV pool; defaults to `dtype`. "int8" and "fp8_e4m3" quantize each
            cached (token, head) row with its own float32 scale (see KV_LAYOUT_QUANTIZED).
        scale: softmax scale; defaults to 1/sqrt(head_dim).
        sliding_window: if set, a query at position p sees keys at positions > p - sliding_window.
        logit_softcap: if set, logits become softcap * tanh(logits / softcap) before the softmax.
        name: optional model name, only for display.
    """

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: str = "float16"
    kv_dtype: str | None = None
    scale: float | None = None
    sliding_window: int | None = None
    logit_softcap: float | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_int("num_q_heads", self.num_q_heads, 1, 1024)
        _check_int("num_kv_heads", self.num_kv_heads, 1, 1024)
        if self.num_q_heads % self.num_kv_heads:
            raise SpecError(
                f"num_q_heads={self.num_q_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}; grouped-query attention needs num_q_heads = k * num_kv_heads"
            )
        _check_int("head_dim", self.head_dim, 32, 256)
        if self.head_dim % 8:
            raise SpecError(f"head_dim={self.head_dim} must be a multiple of 8 (e.g. 64, 96, 128)")
        _check_int("block_size", self.block_size, 1, 256)
        if self.block_size & (self.block_size - 1):
            raise SpecError(
                f"block_size={self.block_size} must be a power of two in 1..256 (e.g. 16)"
            )
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype={self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.kv_dtype is None:
            object.__setattr__(self, "kv_dtype", self.dtype)
        elif self.kv_dtype not in KV_DTYPES:
            raise SpecError(f"kv_dtype={self.kv_dtype!r} is not supported; use one of {', '.join(KV_DTYPES)}")
        if self.scale is None:
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.head_dim))
        elif not (_is_number(self.scale) and math.isfinite(self.scale) and self.scale > 0):
            raise SpecError(f"scale={self.scale!r} must be a positive finite number (or omitted)")
        object.__setattr__(self, "scale", float(self.scale))
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window, 1, 1 << 30)
        if self.logit_softcap is not None:
            cap = self.logit_softcap
            if not (_is_number(cap) and math.isfinite(cap) and cap > 0):
                raise SpecError(f"logit_softcap={cap!r} must be a positive finite number (or omitted)")
            object.__setattr__(self, "logit_softcap", float(cap))

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def kv_layout(self) -> str:
        if self.kv_dtype == "int8":
            return KV_LAYOUT_INT8
        return KV_LAYOUT_QUANTIZED if self.kv_quantized else KV_LAYOUT

    @property
    def kv_quantized(self) -> bool:
        """The pool holds one-byte codes and per-(token, head) scales (int8, fp8_e4m3)."""
        return self.kv_dtype in QUANTIZED_KV

    @property
    def kv_storage_dtype(self) -> str:
        """dtype of the pool array: kv_dtype, or the code dtype of a quantized kv_dtype."""
        return QUANTIZED_KV[self.kv_dtype][0] if self.kv_quantized else self.kv_dtype

    @property
    def kv_scale_rows(self) -> int:
        """Rows after a block's tokens that hold its float32 scales (0 unless quantized)."""
        return -(-4 * self.block_size // self.head_dim) if self.kv_quantized else 0

    @property
    def pool_rows(self) -> int:
        """Rows of one (block, K or V, head) slab of the pool: block_size plus the scale rows."""
        return self.block_size + self.kv_scale_rows

    def pool_shape(self, num_blocks: int | None = None) -> tuple:
        """Shape of one layer's pool (None: any number of blocks)."""
        return (num_blocks, 2, self.num_kv_heads, self.pool_rows, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block (K and V, scales included) in one layer's pool."""
        return 2 * self.num_kv_heads * self.pool_rows * self.head_dim * DTYPE_BYTES[self.kv_storage_dtype]

    @property
    def uri(self) -> str:
        """Readable variant name; the same string names cache folders, logs and symbols."""
        parts = [
            f"q{self.num_q_heads}",
            f"kv{self.num_kv_heads}",
            f"d{self.head_dim}",
            f"bs{self.block_size}",
            _SHORT[self.dtype],
        ]
        if self.kv_dtype != self.dtype:
            parts.append(f"kv{_SHORT[self.kv_dtype]}")
        if not math.isclose(self.scale, 1.0 / math.sqrt(self.head_dim), rel_tol=1e-12):
            parts.append(f"sc{self.scale:.6g}".replace(".", "p"))
        if self.sliding_window is not None:
            parts.append(f"win{self.sliding_window}")
        if self.logit_softcap is not None:
            parts.append(f"cap{self.logit_softcap:g}".replace(".", "p"))
        return "_".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> "AttentionSpec":
        """Build a spec from a mapping, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(
                f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(known))}"
            )
        missing = [k for k in ("num_q_heads", "num_kv_heads", "head_dim") if k not in data]
        if missing:
            raise SpecError(f"{source}: missing required key(s) {', '.join(missing)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise SpecError(f"{source}: {err}") from None

    def digest(self) -> str:
        """A stable hash of every field that changes generated code."""
        data = self.to_dict()
        data.pop("name")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: str | Path) -> AttentionSpec:
    """Read an `AttentionSpec` from a TOML file (keys at top level or under `[attention]`).

    Raises:
        SpecError: the file is missing, is not valid TOML, or holds invalid values.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"spec file {str(path)!r} cannot be read ({err.strerror}); pass an existing TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"spec file {str(path)!r} is not valid TOML: {err}") from None
    if "attention" in data:
        if not isinstance(data["attention"], dict):
            raise SpecError(f"spec file {str(path)!r}: attention must be a table; write the keys under [attention]")
        extra = {k: v for k, v in data.items() if k not in ("attention", "name")}
        if extra:
            raise SpecError(f"spec file {str(path)!r}: keys {sorted(extra)} belong under [attention]")
        body = dict(data["attention"])
        if "name" in data and "name" not in body:
            body["name"] = data["name"]
        data = body
    data.setdefault("name", path.stem)
    return AttentionSpec.from_dict(data, source=f"spec file {str(path)!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name}={value!r} must be an integer in {lo}..{hi}")
    if not lo <= value <= hi:
        raise SpecError(f"{name}={value} is outside {lo}..{hi}")
