"""The KV pools and kernels the runtime tests use: pgen's real CPU kernels, built once per spec."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from pgen_runtime import AttentionSpec, PagedKernels

SPEC = AttentionSpec(num_q_heads=2, num_kv_heads=1, head_dim=32, block_size=4, dtype="float32")


@functools.lru_cache(maxsize=None)
def make_kernels(spec: AttentionSpec = SPEC) -> PagedKernels:
    """pgen's CPU kernels of `spec` (built, or loaded from the build cache, once per process)."""
    import pgen

    return pgen.build_kernels(spec, target="llvm")


@dataclass
class DeviceKV:
    """The `kv` object a KVCacheManager takes: per-layer pools and the kernels that move them."""

    pools: list[np.ndarray]
    kernels: PagedKernels = field(default_factory=make_kernels)


def make_kv(num_blocks: int, num_layers: int = 2, spec: AttentionSpec = SPEC, seed: int = 0) -> DeviceKV:
    """Pools [num_blocks, 2, Hkv, block_size, D] of random values (so stale bytes are visible)."""
    rng = np.random.default_rng(seed)
    shape = (num_blocks, 2, spec.num_kv_heads, spec.block_size, spec.head_dim)
    pools = [rng.standard_normal(shape).astype(spec.kv_dtype) for _ in range(num_layers)]
    return DeviceKV(pools, make_kernels(spec))
