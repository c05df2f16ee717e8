"""Rule for the data-movement kernels (cache write, block copy, swap) on CPU and CUDA.

Step 1 check: the PrimFunc is one of pgen's data-movement nests (one block, spatial loops, head_dim
innermost). Step 2 normalize: fuse every loop but the innermost. Step 3 schedule: on CPU, parallel
outer and vectorized head_dim; on CUDA, `vector` elements per thread for wide loads and stores.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir

from pgen_runtime.spec import DTYPE_BYTES, AttentionSpec

from .base import Knob, ScheduleRule, TargetInfo


class DataMovement(ScheduleRule):
    """Schedules `pgen.lower.DATA_MOVEMENT[kernel](spec)` for one target kind."""

    def __init__(self, kernel: str, target_kind: str) -> None:
        self.kernel = kernel
        self.target_kind = target_kind

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        if self.target_kind == "cuda":
            vec = tuple(v for v in (1, 2, 4, 8) if spec.head_dim % v == 0 and v * DTYPE_BYTES[spec.kv_dtype] <= 16)
            return (Knob("threads", (64, 128, 256, 512), 256), Knob("vector", vec, vec[-1]))
        lanes = tuple(v for v in (4, 8, 16, 32) if spec.head_dim % v == 0)
        return (Knob("vector", lanes, 16 if 16 in lanes else lanes[-1]),)

    def check(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]) -> str | None:
        if spec.head_dim % config["vector"]:
            return f"vector {config['vector']} does not divide head_dim {spec.head_dim}"
        if config.get("threads", 1) > target.max_threads_per_block:
            return f"threads {config['threads']} > the target's limit {target.max_threads_per_block}"
        return None

    def apply(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]):
        from pgen.lower import DATA_MOVEMENT

        if target.kind != self.target_kind or self.kernel not in DATA_MOVEMENT:
            return None
        func = DATA_MOVEMENT[self.kernel](spec)
        sch = s_tir.Schedule(func)
        (block,) = sch.get_child_blocks(sch.get_sblock("root"))
        loops = sch.get_loops(block)
        outer = sch.fuse(*loops[:-1])
        inner_o, inner_i = sch.split(loops[-1], [None, config["vector"]])
        if target.kind == "llvm":
            sch.parallel(outer)
            sch.vectorize(inner_i)
        else:
            fused = sch.fuse(outer, inner_o)
            bx, tx = sch.split(fused, [None, config["threads"]])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(inner_i)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
