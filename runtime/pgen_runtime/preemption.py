"""Preemption: the host block pool that swapped sequences live in, and the swap-or-recompute policy.

NOTE: bytes move only through the kernels of the `kv` object the manager was given:
`kernels.swap_out(kv_pool, block_ids, host_buf)` gathers device blocks into a contiguous buffer and
`kernels.swap_in(host_buf, block_ids, kv_pool)` scatters one back. The host pool keeps one numpy
array per layer, [num_host_blocks, 2, num_kv_heads, block_size, head_dim], and copies whole
blocks in and out of it, so a swap out + swap in restores every byte of a block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, OutOfBlocksError
from .tensors import copy_from_bytes, empty, parse_device, to_numpy

SWAP = "swap"
RECOMPUTE = "recompute"


@dataclass(frozen=True, slots=True)
class PreemptionPolicy:
    """Chooses how to preempt a sequence: swap its blocks to the host, or recompute them later.

    Args:
        mode: "swap" or "recompute" to force one; None picks the cheaper by estimated time.
        host_bytes_per_s: host <-> device copy bandwidth (default: PCIe 4.0 x16, effective).
        recompute_tokens_per_s: prefill throughput of the model being served.
    """

    mode: str | None = None
    host_bytes_per_s: float = 16e9
    recompute_tokens_per_s: float = 10_000.0

    def __post_init__(self) -> None:
        if self.mode not in (None, SWAP, RECOMPUTE):
            raise ConfigError(f"mode={self.mode!r} is not a preemption mode; use 'swap', 'recompute' or None")
        for name in ("host_bytes_per_s", "recompute_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive rate")

    def choose(self, num_tokens: int, num_bytes: int, can_swap: bool, can_recompute: bool) -> str:
        """The mode to use; a forced mode is returned even when it cannot run (the caller raises).

        Swapping costs the bytes moved out and back in; recomputing costs a prefill of every token.
        """
        if self.mode is not None:
            return self.mode
        if not (can_swap and can_recompute):
            return SWAP if can_swap else RECOMPUTE
        swap_s = 2 * num_bytes / self.host_bytes_per_s
        recompute_s = num_tokens / self.recompute_tokens_per_s
        return SWAP if swap_s <= recompute_s else RECOMPUTE


class HostPool:
    """Host blocks with their own capacity, and the byte moves between them and the device pools.

    Args:
        num_blocks: host blocks (0 disables swapping).
        kv: the manager's `kv` object (per-layer `pools` and `kernels`), or None to track ids only.
    """

    def __init__(self, num_blocks: int, kv: Any | None) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ConfigError(f"num_host_blocks={num_blocks!r} must be an integer >= 0 (0: no swapping)")
        self.num_blocks = num_blocks
        self._free_ids = list(range(num_blocks - 1, -1, -1))
        self._kv = kv
        pools = [] if kv is None else kv.pools
        # A GPU's pools stage their blocks in device memory (the swap kernels gather and scatter
        # there), then one copy moves them to or from these host buffers.
        self._device = None if kv is None else parse_device(kv.kernels.device)
        self._on_gpu = self._device is not None and self._device.dlpack_device_type() != 1
        # Host copies of device tensors take numpy dtypes from the spec (bfloat16 as its uint16 bits).
        storage = kv.kernels.spec.kv_storage_dtype if self._on_gpu else None
        gpu_dtype = "uint16" if storage == "bfloat16" else storage
        self.buffers = [np.empty((num_blocks, *tuple(pool.shape)[1:]), dtype=gpu_dtype or pool.dtype) for pool in pools]

    @property
    def num_free(self) -> int:
        return len(self._free_ids)

    def store(self, device_ids: list[int]) -> list[int]:
        """Copy device blocks into newly taken host blocks; returns the host ids, in order."""
        if len(device_ids) > self.num_free:
            raise OutOfBlocksError(
                f"swap_out needs {len(device_ids)} host blocks but {self.num_free} are free; "
                "raise num_host_blocks or preempt by recompute"
            )
        host_ids = [self._free_ids.pop() for _ in device_ids]
        if self._kv is not None and device_ids:
            ids = np.asarray(device_ids, dtype=np.int32)
            for pool, buffer in zip(self._kv.pools, self.buffers):
                if self._on_gpu:
                    staging = empty((len(ids), *tuple(pool.shape)[1:]), self._kv.kernels.spec.kv_storage_dtype, self._device)
                    self._kv.kernels.swap_out(pool, ids, staging)
                    buffer[host_ids] = to_numpy(staging).view(buffer.dtype)
                else:
                    staging = np.empty((len(ids), *pool.shape[1:]), dtype=pool.dtype)
                    self._kv.kernels.swap_out(pool, ids, staging)
                    buffer[host_ids] = staging
        return host_ids

    def load(self, host_ids: list[int], device_ids: list[int]) -> None:
        """Copy host blocks into the given device blocks and give the host blocks back."""
        assert len(host_ids) == len(device_ids)
        if self._kv is not None and device_ids:
            ids = np.asarray(device_ids, dtype=np.int32)
            for pool, buffer in zip(self._kv.pools, self.buffers):
                blocks = np.ascontiguousarray(buffer[host_ids])
                if self._on_gpu:
                    staged = empty(blocks.shape, self._kv.kernels.spec.kv_storage_dtype, self._device)
                    copy_from_bytes(staged, blocks)
                    blocks = staged
                self._kv.kernels.swap_in(blocks, ids, pool)
        self.release(host_ids)

    def release(self, host_ids: list[int]) -> None:
        self._free_ids.extend(reversed(host_ids))
