"""CudaExtendSimt: extend on CUDA cores, the fallback for every spec (cuda_simt's template)."""

from __future__ import annotations

from pgen_runtime.spec import AttentionSpec

from . import cuda_simt
from .base import Knob, TargetInfo


class CudaExtendSimt(cuda_simt.SimtRule):
    """A block: `q_tile` query tokens of one sequence times a KV head's GQA group, causal."""

    kernel = "extend"

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        return (*cuda_simt.lane_knobs(spec, key_lanes=2),
                # Query tokens per block: each K/V tile serves q_tile x group rows (fewer where groups are large).
                Knob("q_tile", (1, 2, 4, 8), 4 if spec.group_size <= 4 else 2))
