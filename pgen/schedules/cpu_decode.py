"""CpuDecode: decode (one query row per sequence) on the CPU, from the CPU attention template."""

from __future__ import annotations

from typing import Any

from pgen_runtime.spec import AttentionSpec

from . import cpu_template
from .base import Knob, ScheduleRule, TargetInfo
from .cpu_template import decode_rows, row_tile


class CpuDecode(ScheduleRule):
    """A task: one sequence's query row times a KV head group, over one split of its keys."""

    kernel = "decode"
    target_kind = "llvm"

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        rtile = row_tile(decode_rows(spec.group_size), 8)
        return (*cpu_template.memory_knobs(spec, target),
                Knob("kv_streams", (1, 2), 1),  # two runs of the task's blocks read side by side
                *cpu_template.qk_knobs(spec, target, rtile, row_merge=rtile in (2, 4, 8)))

    def check(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]) -> str | None:
        return cpu_template.check(spec, target, config, decode_rows(spec.group_size))

    def apply(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]):
        if target.kind != self.target_kind:
            return None
        return cpu_template.attention(spec, True, config)
