"""CPU rule for the dense layers of a compiled model: `C[.., i, j] = sum_k A[.., i, k] * B[k, j]` + epilogue.

TVM's CPU pipeline leaves the PrimFuncs that Relax legalizes from `matmul` unscheduled: one scalar
loop nest on one thread, about 2.5 GFLOP/s here, which made the tiny model's per-token cost the same
at every batch size. This rule gives them a register-tiled micro-kernel in the form TVM's own x86
dense schedules use:

Step 1 check: the function holds one reduction block with two inputs, iterators (unit dims.., i, j,
k) and a float32 output; every other block is elementwise after it (bias, residual add, SiLU
gating). Step 2 normalize: pad j to the tile width (`pad_einsum`: a vocabulary of 259 becomes 288
with 32-wide tiles) and inline the epilogue into its last block. Step 3 schedule: tile (i, j) into
`rows` x `cols`, loop k outside the tile so each B vector is reused `rows` times, keep the tile in
registers (a stack array under TVM's 1 KiB limit, see the NOTE in `apply`), vectorize j, run the
epilogue on the tile as it leaves the registers, and spread the (i, j) tiles over the threads.
Defaults measured on the tiny model's seven dense layers (znver5, 2 threads): rows 4 x cols 32
takes 185 us at 64 tokens where 1 x 64 takes 275 us and the unscheduled loops 9 ms.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.schedule import ScheduleError

from .base import Knob, TargetInfo

_MAX_TILE_BYTES = 1024  # TVM 0.27 moves a CPU buffer of this size or more to the heap


def knobs(target: TargetInfo) -> tuple[Knob, ...]:
    lanes = target.vector_bits // 32
    return (Knob("rows", (1, 2, 4, 6, 8), 4), Knob("cols", (lanes, 2 * lanes, 4 * lanes), 2 * lanes))


def default(target: TargetInfo) -> dict[str, Any]:
    return {k.name: k.default for k in knobs(target)}


def check(config: dict[str, Any], elem_bytes: int = 4) -> str | None:
    if config["rows"] * config["cols"] * elem_bytes >= _MAX_TILE_BYTES:
        return (f"a {config['rows']}x{config['cols']} tile is not under {_MAX_TILE_BYTES} bytes and would leave "
                "the registers for the heap; lower rows or cols")
    return None


def _matmul_block(sch: s_tir.Schedule) -> s_tir.SBlockRV | None:
    """The first block, if it is the function's one reduction: iterators (unit dims.., i, j, k), two
    inputs, a float32 output; and every later block elementwise. Else None."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(b).iter_vars)]
    if len(reductions) != 1:
        return None
    block = reductions[0]
    stmt = sch.get(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if kinds[-1] != tirx.IterVar.CommReduce or kinds.count(tirx.IterVar.CommReduce) != 1 or len(kinds) < 3:
        return None
    if any(not _is_one(iv.dom.extent) for iv in stmt.iter_vars[:-3]):
        return None
    if len(stmt.reads) != 2 or len(stmt.writes) != 1 or not _is_float32(stmt.writes[0]):
        return None
    if blocks.index(block) != 0 or not all(_is_elementwise(sch.get(b)) for b in blocks[1:]):
        return None
    return block


def _is_one(expr) -> bool:
    return isinstance(expr, tirx.IntImm) and expr.value == 1


def _is_float32(region) -> bool:
    buffer = getattr(region, "buffer", None) or region.source  # TVM 0.27: a TensorRegion's source
    return buffer.dtype == "float32"


def _is_elementwise(block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in block.iter_vars)


def apply(func: tirx.PrimFunc, target: TargetInfo, config: dict[str, Any] | None = None) -> tirx.PrimFunc | None:
    """The scheduled function, or None when `func` is not a dense layer this rule knows."""
    if target.kind != "llvm" or func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
        return None
    config = config or default(target)
    why = check(config)
    if why is not None:
        raise ValueError(why)
    rows, cols = config["rows"], config["cols"]
    sch = s_tir.Schedule(func)
    block = _matmul_block(sch)
    if block is None:
        return None
    n_extent = sch.get(block).iter_vars[-2].dom.extent
    if not isinstance(n_extent, tirx.IntImm):
        return None
    n = n_extent.value
    cols = min(cols, _round_up(n, target.vector_bits // 32))
    if n % cols:
        sch.pad_einsum(block, [1] * (len(sch.get(block).iter_vars) - 2) + [cols, 1])
    _inline_epilogue(sch, block)
    *units, i, j, k = sch.get_loops(block)
    io, ii = sch.split(i, [None, rows])
    jo, ji = sch.split(j, [None, cols])
    sch.reorder(io, jo, k, ii, ji)
    # NOTE: "global" scope, not "local": TVM 0.27 lowers a local buffer on the CPU to a heap
    # workspace (TVMBackendAllocWorkspace) whatever its size; a global one under 1 KiB, placed
    # inside the parallel loop, becomes a stack array that LLVM keeps in registers (2x faster).
    local = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(local, jo, preserve_unit_loops=True)
    consumers = sch.get_consumers(local)
    # The epilogue runs on the tile as it leaves the registers and writes the output directly.
    # NOTE: reverse_compute_inline into the write-back drops the write-back's row predicate in TVM
    # 0.27 (rows past num_tokens get written), so the epilogue is moved under the tile loop and the
    # write-back inlined into it instead.
    for consumer in consumers:
        sch.reverse_compute_at(consumer, jo, preserve_unit_loops=True)
    if consumers:
        sch.compute_inline(local)
    for consumer in consumers or [local]:
        _vectorize_inner(sch, consumer)
    sch.unroll(ii)
    sch.vectorize(ji)  # vectorize and parallel before decompose_reduction: the update alone is no reduction
    sch.parallel(sch.fuse(*units, io, jo))
    sch.decompose_reduction(block, k)
    for pad in sch.get_child_blocks(sch.get_sblock("root")):
        if pad.same_as(block) or sch.get_producers(pad) or not sch.get(pad).name_hint.endswith("_pad"):
            continue  # only the blocks that pad an input (pad_einsum) sit at the root to parallelize
        loops = sch.get_loops(pad)
        if len(loops) >= 2:
            sch.parallel(sch.fuse(*loops[:-1]))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _inline_epilogue(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    """Inline the elementwise blocks after the matmul into the output block (SiLU chains, bias, unpad).

    Blocks that pad an input for `pad_einsum` stay: they feed the matmul, not the epilogue.
    """
    root = sch.get_sblock("root")
    keep = {sch.get(block).name_hint, *(sch.get(b).name_hint for b in sch.get_output_blocks(root))}
    for name in [sch.get(b).name_hint for b in sch.get_child_blocks(root)]:
        other = sch.get_sblock(name)
        if name in keep or not sch.get_producers(other):
            continue
        try:
            sch.compute_inline(other)
        except ScheduleError:
            pass


def _vectorize_inner(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    loops = sch.get_loops(block)
    try:
        sch.vectorize(loops[-1])
    except ScheduleError:
        pass
