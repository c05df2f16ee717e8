"""CudaDecodeSimt: decode on CUDA cores, the fallback for every spec (cuda_simt's template)."""

from __future__ import annotations

from pgen_runtime.spec import AttentionSpec

from . import cuda_simt
from .base import Knob, TargetInfo
from .cuda_common import MAX_SPLITS


class CudaDecodeSimt(cuda_simt.SimtRule):
    """A block: one sequence's query row times a KV head's GQA group, over one split of its keys."""

    kernel = "decode"

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        knobs = (*cuda_simt.lane_knobs(spec, key_lanes=4),
                 MAX_SPLITS)  # split-KV cap: a long sequence spreads over more blocks
        if spec.group_size > 1:
            # 1, or the whole group per thread: each K/V element is then read and converted once for all rows.
            knobs += (Knob("group_rows", (1, spec.group_size), 1),)
        return knobs
