"""The kernels a package holds: names and argument signatures, in one table.

Lowering checks every scheduled PrimFunc's parameters against it, builds and packages export these
names, `PagedKernels` binds them, and measurement and the references build their arguments from
it. The runtime holds the table because a serving host has no compiler to ask.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KernelSignature:
    """One kernel: the compiled function's parameters, and `PagedKernels`' array arguments."""

    name: str
    params: tuple[str, ...]  # the compiled function's parameters, in order
    call: tuple[str, ...]  # the arrays `PagedKernels.<name>` takes, in order
    writes: str  # the argument it writes (its output)


_ATTENTION = ("q", "kv_pool", "block_tables", "q_indptr", "seq_lens", "out", "num_splits", "max_q_tiles")

KERNELS = (
    KernelSignature("decode", _ATTENTION, ("q", "kv_pool", "block_tables", "seq_lens", "out"), "out"),
    KernelSignature("extend", _ATTENTION, ("q", "kv_pool", "block_tables", "q_indptr", "seq_lens", "out"), "out"),
    KernelSignature("cache_write", ("k", "v", "kv_pool", "slot_mapping"), ("k", "v", "kv_pool", "slot_mapping"), "kv_pool"),
    KernelSignature("copy_blocks", ("kv_pool", "pairs"), ("kv_pool", "pairs"), "kv_pool"),
    KernelSignature("swap_out", ("kv_pool", "block_ids", "buf"), ("kv_pool", "block_ids", "host_buf"), "host_buf"),
    KernelSignature("swap_in", ("buf", "block_ids", "kv_pool"), ("host_buf", "block_ids", "kv_pool"), "kv_pool"),
)
KERNEL_NAMES = tuple(k.name for k in KERNELS)  # the order manifests list them in
SIGNATURES = {k.name: k for k in KERNELS}
ATTENTION_KERNELS = ("decode", "extend")  # the kernels with knobs worth tuning
DATA_MOVEMENT_KERNELS = tuple(n for n in KERNEL_NAMES if n not in ATTENTION_KERNELS)
