"""NumPy block copy and swap kernels, and the choice of kernels (and KV pools) runtime tests use.

`NumpyKernels` has the signatures of the callables `pgen.build_kernels(spec, target="llvm")`
returns, so the manager cannot tell them apart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pgen_runtime import AttentionSpec

# NOTE: the one line to switch when pgen's CPU kernels land. "auto" uses pgen.build_kernels when it
# imports and builds, else these NumPy kernels; "pgen" requires the real kernels (tests fail
# without them), which is what the runtime tests must end up running.
KERNELS = "pgen"

SPEC = AttentionSpec(num_q_heads=2, num_kv_heads=1, head_dim=32, block_size=4, dtype="float32")


class NumpyKernels:
    """Reference block copy / swap on numpy arrays, in place, like the compiled kernels."""

    name = "numpy"

    @staticmethod
    def copy_blocks(kv_pool: np.ndarray, pairs: np.ndarray) -> None:
        """kv_pool[dst] = kv_pool[src] for each (src, dst) row of int32 `pairs` [P, 2]."""
        kv_pool[pairs[:, 1]] = kv_pool[pairs[:, 0]]

    @staticmethod
    def swap_out(kv_pool: np.ndarray, block_ids: np.ndarray, host_buf: np.ndarray) -> None:
        """Gather the listed blocks into the contiguous `host_buf` [n, 2, Hkv, bs, D]."""
        host_buf[...] = kv_pool[block_ids]

    @staticmethod
    def swap_in(host_buf: np.ndarray, block_ids: np.ndarray, kv_pool: np.ndarray) -> None:
        """Scatter `host_buf` [n, 2, Hkv, bs, D] back into the listed blocks."""
        kv_pool[block_ids] = host_buf


@functools.lru_cache(maxsize=None)
def make_kernels(spec: AttentionSpec = SPEC) -> Any:
    """The kernels the tests run: pgen's CPU kernels, or NumPy ones while KERNELS == "auto"."""
    try:
        import pgen

        return pgen.build_kernels(spec, target="llvm")
    except Exception:  # "auto": a compiler side that is absent or broken must not stop these tests
        if KERNELS == "pgen":
            raise
        return NumpyKernels()


@dataclass
class DeviceKV:
    """The `kv` object a KVCacheManager takes: per-layer pools and the kernels that move them."""

    pools: list[np.ndarray]
    kernels: Any = field(default_factory=make_kernels)


def make_kv(num_blocks: int, num_layers: int = 2, spec: AttentionSpec = SPEC, seed: int = 0) -> DeviceKV:
    """Pools [num_blocks, 2, Hkv, block_size, D] of random values (so stale bytes are visible)."""
    rng = np.random.default_rng(seed)
    shape = (num_blocks, 2, spec.num_kv_heads, spec.block_size, spec.head_dim)
    pools = [rng.standard_normal(shape).astype(spec.kv_dtype) for _ in range(num_layers)]
    return DeviceKV(pools, make_kernels(spec))
