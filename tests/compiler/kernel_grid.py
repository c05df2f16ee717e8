"""The spec grid the kernel tests run: the full grid of the kernels issue and its smoke subset.

Every spec costs one build (a few seconds, then cached on disk), so the smoke subset covers each
value of each axis at least once with a dozen specs; `pytest -m full` runs the rest.
"""

from __future__ import annotations

import itertools

import pytest

from pgen import AttentionSpec

HEAD_DIMS = (64, 96, 128, 256)
HEADS = ((8, 8), (32, 8), (14, 2))  # GQA groups 1, 4 and 7
BLOCK_SIZES = (8, 16, 32)
DTYPES = ("float32", "float16")

# (head_dim, heads, block_size, dtype) of the grid that CI runs.
SMOKE = {
    (64, (8, 8), 8, "float32"),
    (64, (14, 2), 16, "float16"),
    (96, (32, 8), 16, "float16"),
    (96, (14, 2), 8, "float32"),
    (128, (14, 2), 32, "float32"),
    (128, (8, 8), 16, "float16"),
    (256, (32, 8), 8, "float16"),
    (256, (8, 8), 32, "float32"),
}

# Masking variants, checked on long sequences. The soft-cap ones use a large scale: logits of
# random unit vectors are small, and a cap far above them would change nothing.
VARIANTS = {
    "window": (dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float32",
                    sliding_window=100), True),
    "softcap": (dict(num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16",
                     scale=0.5, logit_softcap=5.0), True),
    "window+softcap": (dict(num_q_heads=32, num_kv_heads=8, head_dim=96, block_size=32, dtype="float16",
                            sliding_window=37, logit_softcap=10.0, scale=0.4), True),
    "window<block": (dict(num_q_heads=8, num_kv_heads=8, head_dim=64, block_size=16, dtype="float32",
                          sliding_window=5), False),
    "gemma2": (dict(num_q_heads=16, num_kv_heads=8, head_dim=256, block_size=16, dtype="float16",
                    logit_softcap=50.0), False),
    "mistral": (dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16",
                     sliding_window=2000), False),
}


def _param(spec: AttentionSpec, smoke: bool):
    return pytest.param(spec, id=spec.uri, marks=() if smoke else pytest.mark.full)


GRID = [
    _param(AttentionSpec(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dt),
           (d, (hq, hkv), bs, dt) in SMOKE)
    for d, (hq, hkv), bs, dt in itertools.product(HEAD_DIMS, HEADS, BLOCK_SIZES, DTYPES)
]
# Quantized KV caches (int8, fp8 e4m3): every head dim, GQA group and block size at least once per
# code, the scale-row edge cases (block_size 1: a scale row mostly empty; 128 tokens of head_dim 64:
# eight scale rows), and the masking variants. (kv_dtype, head_dim, heads, block_size, dtype, extra, smoke)
QUANTIZED = [
    ("int8", 64, (8, 8), 8, "float32", {}, True),
    ("int8", 96, (14, 2), 16, "float16", {}, True),
    ("int8", 128, (32, 8), 16, "float16", {}, False),
    ("int8", 256, (8, 8), 32, "float32", {}, False),
    ("int8", 64, (14, 2), 128, "float16", {}, True),
    ("int8", 32, (8, 8), 1, "float32", {}, False),
    ("int8", 96, (32, 8), 32, "float16", dict(sliding_window=37, logit_softcap=10.0, scale=0.4), True),
    ("fp8_e4m3", 64, (14, 2), 32, "float16", {}, True),
    ("fp8_e4m3", 128, (32, 8), 16, "float32", {}, True),
    ("fp8_e4m3", 96, (8, 8), 8, "float16", {}, False),
    ("fp8_e4m3", 256, (32, 8), 16, "float16", {}, False),
    ("fp8_e4m3", 256, (16, 8), 16, "float16", dict(logit_softcap=50.0), False),
    ("fp8_e4m3", 128, (32, 8), 16, "float16", dict(sliding_window=100), False),
]
MASKED = [_param(AttentionSpec(**fields), smoke) for fields, smoke in VARIANTS.values()]
QUANT = [
    _param(AttentionSpec(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=dt, kv_dtype=kv, **extra),
           smoke)
    for kv, d, (hq, hkv), bs, dt, extra, smoke in QUANTIZED
]
ALL = GRID + MASKED + QUANT
SMOKE_SPECS = [p.values[0] for p in ALL if not p.marks]


def lengths(spec: AttentionSpec) -> list[int]:
    """The lengths of the issue: 1, block_size - 1, block_size + 1, and one of at least 2048."""
    bs = spec.block_size
    return [1, max(bs - 1, 1), bs + 1, 2048 + 3 * bs // 2 + 1]
