"""CpuExtend: extend (ragged new rows over the paged cache, causal) on the CPU, from the CPU
attention template. The engine's every CPU step runs it, one-token decode rows included."""

from __future__ import annotations

from typing import Any

from pgen_runtime.spec import AttentionSpec

from . import cpu_template
from .base import Knob, ScheduleRule, TargetInfo
from .cpu_template import row_tile


class CpuExtend(ScheduleRule):
    """A task: `q_tile` query tokens of one sequence times a KV head group, over one split."""

    kernel = "extend"
    target_kind = "llvm"

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        rtile = row_tile(spec.group_size * 4, 4)
        return (*cpu_template.memory_knobs(spec, target),
                Knob("q_tile", (1, 2, 4, 8, 16), 4),  # query tokens per task
                Knob("row_tile_max", (2, 4, 8), 4),  # rows per register tile at most (8 spill registers)
                *cpu_template.qk_knobs(spec, target, rtile, row_merge=True))

    def check(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]) -> str | None:
        return cpu_template.check(spec, target, config, config["q_tile"] * spec.group_size)

    def apply(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]):
        if target.kind != self.target_kind:
            return None
        return cpu_template.attention(spec, False, config)
