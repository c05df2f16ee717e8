"""Schedule rules, one per file, and the registry that picks the rule for a kernel and target."""

from __future__ import annotations

from .base import Knob, ScheduleRule, TargetInfo
from .cpu_attention import CpuAttention
from .cuda_decode import CudaDecode
from .cuda_extend import CUDA_PRELUDE, CudaExtend
from .data_movement import DataMovement

_DATA_MOVEMENT = ("cache_write", "copy_blocks", "swap_out", "swap_in")


def rule_for(kernel: str, target_kind: str) -> ScheduleRule:
    """The rule that schedules `kernel` ("decode", "extend", ...) for "llvm" or "cuda"."""
    if kernel in ("decode", "extend"):
        if target_kind == "llvm":
            return CpuAttention(kernel)
        return CudaDecode() if kernel == "decode" else CudaExtend()
    if kernel in _DATA_MOVEMENT:
        return DataMovement(kernel, target_kind)
    raise KeyError(f"no schedule rule for kernel {kernel!r}")


__all__ = ["CUDA_PRELUDE", "Knob", "ScheduleRule", "TargetInfo", "rule_for"]
