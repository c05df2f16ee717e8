"""CPU rule for the dense layers of a compiled model: `C[.., i, j] = sum_k A[.., i, k] * B[k, j]` + epilogue.

TVM's CPU pipeline leaves the PrimFuncs that Relax legalizes from `matmul` unscheduled: one scalar
loop nest on one thread, about 2.5 GFLOP/s here, which made the tiny model's per-token cost the same
at every batch size. This rule gives them a register-tiled micro-kernel in the form TVM's own x86
dense schedules use:

Step 1 check: the function holds one reduction block with two inputs, iterators (unit dims.., i, j,
k) and a float32 output; every other block is elementwise after it (bias, residual add, SiLU
gating). Step 2 normalize: pad i to the row tile and j to the column tile (`pad_einsum`: a
vocabulary of 259 becomes 288 with 32-wide tiles; the token rows of A are copied padded, so no row
predicate sits inside the k loop), inline the epilogue into its last block, and, when the weight is
a constant (`constant_params`), read it packed as [N / cols, K, cols] (see `_pack_weight`). Step 3
schedule: tile (i, j) into `rows` x `cols`, loop k outside the tile so each B vector is reused
`rows` times, keep the tile in registers (a stack array under TVM's 1 KiB limit, see the NOTE in
`apply`), vectorize j, run the epilogue on the tile as it leaves the registers, and spread the
(column panel, row tile) pairs over the threads, row tiles inner.

Measured (old and new package of the Qwen2.5-0.5B shape side by side, Zen 4, 2 threads;
docs/performance.md): packing and the padded rows made generation 2.65x faster at batch 1 (weights
had been read at a stride of a whole row per k) and 3.18x at batch 32 (the row predicate had kept
the accumulators in memory: a load and store around every FMA).
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.s_tir.schedule import ScheduleError

from .base import Knob, TargetInfo

_MAX_TILE_BYTES = 1024  # TVM 0.27 moves a CPU buffer of this size or more to the heap


BF16_LANES = 16  # vdpbf16ps: 16 float32 lanes, each the sum of 2 bf16 products
# vdpbf16ps has a latency of several cycles: 6 x 32 keeps 12 independent accumulators in flight
# (4 x 32's 8 left it latency-bound: 505 against 575-625 GFLOP/s, Zen 5, docs/performance.md).
BF16_TILE = (6, 32)


INT8_LANES = 16  # vpdpbusd: 16 int32 lanes, each the sum of 4 u8 x s8 products
# 4 x 32 against 6 x 32 (bf16's), one 896 x 4864 layer with SiLU, Zen 4, 2 cores, interleaved:
# 181 / 128 GOP/s at 1 token (fewer padded rows), 688 / 512 at 8, 752 / 678 at 32, 779 / 762 at 256;
# 8 x 16 and 2 x 64 were within 5% from 8 tokens up (docs/performance.md).
INT8_TILE = (4, 32)


def knobs(target: TargetInfo) -> tuple[Knob, ...]:
    lanes = target.vector_bits // 32
    return (Knob("rows", (1, 2, 4, 6, 8), 4), Knob("cols", (lanes, 2 * lanes, 4 * lanes), 2 * lanes),
            # bf16 weights (`pgen.onnx.weights`): pairs of products by AVX-512 BF16's vdpbf16ps, else
            # widened weights and fp32 FMAs.
            Knob("bf16_dot", (0, 1), int("avx512_bf16" in target.features)))


def has_vnni(target: TargetInfo) -> bool:
    """Whether int8 weights (`pgen.onnx.weights.int8_weights`) build for `target`: they need
    AVX-512 VNNI's vpdpbusd."""
    return target.kind == "llvm" and "avx512_vnni" in target.features


def default(target: TargetInfo) -> dict[str, Any]:
    return {k.name: k.default for k in knobs(target)}


def check(config: dict[str, Any], elem_bytes: int = 4, target: TargetInfo | None = None) -> str | None:
    if config["rows"] * config["cols"] * elem_bytes >= _MAX_TILE_BYTES:
        return (f"a {config['rows']}x{config['cols']} tile is not under {_MAX_TILE_BYTES} bytes and would leave "
                "the registers for the heap; lower rows or cols")
    if config.get("bf16_dot") and target is not None and "avx512_bf16" not in target.features:
        return "bf16_dot=1 needs a CPU with avx512_bf16 (vdpbf16ps); use bf16_dot=0"
    if config.get("bf16_dot") and config["cols"] % BF16_LANES:
        return f"bf16_dot=1 needs cols a multiple of {BF16_LANES}; got cols={config['cols']}"
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
    if len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return None
    if not _is_float32(stmt.writes[0]) and not (_is_int8(stmt) and _buffer(stmt.writes[0]).dtype == "int32"):
        return None
    if blocks.index(block) != 0 or not all(_is_elementwise(sch.get(b)) for b in blocks[1:]):
        return None
    return block


def _is_one(expr) -> bool:
    return isinstance(expr, tirx.IntImm) and expr.value == 1


def _is_float32(region) -> bool:
    return _buffer(region).dtype == "float32"


def _buffer(region) -> tirx.Buffer:
    return getattr(region, "buffer", None) or region.source  # TVM 0.27: a TensorRegion's source


def _is_elementwise(block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in block.iter_vars)


def apply(func: tirx.PrimFunc, target: TargetInfo, config: dict[str, Any] | None = None,
          constant_params: frozenset[int] = frozenset()) -> tirx.PrimFunc | None:
    """The scheduled function, or None when `func` is not a dense layer this rule knows.

    `constant_params`: positions of the parameters that every caller passes a constant (a weight).
    A constant 2-D weight B[k, j] is read through a packed copy B_packed[j // cols, k, j % cols],
    made by a block marked `meta_schedule.layout_rewrite_preproc`: Relax's
    SplitLayoutRewritePreproc moves it into its own function and FoldConstant runs it once, at
    compile time (see `model_pipeline`).
    """
    if target.kind != "llvm" or func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
        return None
    given = config
    config = {**default(target), **(config or {})}
    why = check(config, target=target)
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
    weight = _constant_weight(sch, block, func, constant_params)
    bf16 = _is_bf16(sch.get(block))
    pairs = bf16 and bool(config["bf16_dot"]) and weight is not None and _k_extent(sch, block) % 2 == 0
    quads = _is_int8(sch.get(block))
    if quads and (weight is None or _k_extent(sch, block) % 4 or not has_vnni(target)):
        return None  # int8 weights are only written for constant [K % 4 == 0] weights on VNNI hosts
    if pairs and not given:
        rows, cols = BF16_TILE
    if quads:
        rows, cols = (config["rows"], config["cols"]) if given else INT8_TILE
    cols = min(cols, _round_up(n, BF16_LANES if pairs or quads else target.vector_bits // 32))
    # Rows pad to the tile too (a padded copy of A): a row predicate inside the k loop would make
    # every update a conditional store, and LLVM would keep the tile in memory, not in registers.
    sch.pad_einsum(block, [1] * (len(sch.get(block).iter_vars) - 3) + [rows, cols, 1])
    _inline_epilogue(sch, block)
    if weight is not None:
        _pack_weight(sch, block, weight, cols, 4 if quads else 2 if pairs else 1)
    *units, i, j, k = sch.get_loops(block)
    io, ii = sch.split(i, [None, rows])
    jo, ji = sch.split(j, [None, cols])
    # Column panels outside row tiles: with several row tiles (a batch of tokens) one thread
    # reads a weight panel once from memory and again from its L2 for every further row tile.
    if pairs or quads:
        k, k2 = sch.split(k, [None, 4 if quads else 2])
        jv, j16 = sch.split(ji, [None, BF16_LANES])
        sch.reorder(jo, io, k, ii, jv, j16, k2)
    else:
        sch.reorder(jo, io, k, ii, ji)
    # NOTE: "global" scope, not "local": TVM 0.27 lowers a local buffer on the CPU to a heap
    # workspace (TVMBackendAllocWorkspace) whatever its size; a global one under 1 KiB, placed
    # inside the parallel loop, becomes a stack array that LLVM keeps in registers (2x faster).
    local = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(local, io, preserve_unit_loops=True)
    consumers = sch.get_consumers(local)
    # The epilogue runs on the tile as it leaves the registers and writes the output directly.
    # NOTE: reverse_compute_inline into the write-back drops the write-back's row predicate in TVM
    # 0.27 (rows past num_tokens get written), so the epilogue is moved under the tile loop and the
    # write-back inlined into it instead.
    for consumer in consumers:
        sch.reverse_compute_at(consumer, io, preserve_unit_loops=True)
    if consumers:
        sch.compute_inline(local)
    for consumer in consumers or [local]:
        _vectorize_inner(sch, consumer)
    sch.unroll(ii)
    if pairs or quads:
        sch.unroll(jv)
    else:
        sch.vectorize(ji)  # vectorize and parallel before decompose_reduction: the update alone is no reduction
    outer = sch.fuse(*units, jo, io)
    sch.parallel(outer)
    init = sch.decompose_reduction(block, k)
    if pairs:
        _vectorize_inner(sch, init)
        sch.tensorize(j16, BF16_DOT_INTRIN)
        sch.annotate(outer, "pragma_import_llvm", _DPBF16_LL)
    elif quads:
        _vectorize_inner(sch, init)
        sch.tensorize(j16, INT8_DOT_INTRIN)
        sch.annotate(outer, "pragma_import_llvm", _DPBUSD_LL)
    for pad in sch.get_child_blocks(sch.get_sblock("root")):
        if pad.same_as(block) or sch.get_producers(pad) or not sch.get(pad).name_hint.endswith("_pad") or \
                sch.get(pad).annotations.get(PREPROC, False):
            continue  # only the blocks that pad an input (pad_einsum) sit at the root to parallelize
        loops = sch.get_loops(pad)
        # The token rows of A (a dynamic extent) stay on one thread: a few rows at decode, where a
        # parallel launch costs more than the copy. A weight that is an input pads in parallel.
        if len(loops) >= 2 and all(isinstance(sch.get(loop).extent, tirx.IntImm) for loop in loops):
            sch.parallel(sch.fuse(*loops[:-1]))
    scheduled = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return scheduled.with_attr(PACKS_WEIGHT, True) if weight is not None else scheduled


PREPROC = "meta_schedule.layout_rewrite_preproc"
PACKS_WEIGHT = "pgen.packs_weight"  # a function attribute: it holds a PREPROC block


def _constant_weight(sch: s_tir.Schedule, block: s_tir.SBlockRV, func: tirx.PrimFunc,
                     constant_params: frozenset[int]) -> tirx.Buffer | None:
    """The matmul's B[k, j] when it is a 2-D parameter every caller passes as a constant."""
    stmt = sch.get(block)
    k_var, j_var = stmt.iter_vars[-1].var, stmt.iter_vars[-2].var
    for read in stmt.reads:
        region = read.region
        if len(region) == 2 and region[0].min.same_as(k_var) and region[1].min.same_as(j_var):
            # TVM 0.27: a PrimFunc's buffer parameters are the buffers themselves.
            if any(index < len(func.params) and func.params[index].same_as(_buffer(read)) for index in constant_params):
                return _buffer(read)
    return None


def _pack_weight(sch: s_tir.Schedule, block: s_tir.SBlockRV, weight: tirx.Buffer, cols: int,
                 group: int = 1) -> None:
    """Read B through B_packed[j // cols, k, j % cols]: each column tile's k loop streams one
    contiguous panel (B itself is read at a stride of a whole row per k: a new page every few k).
    With `group` 2 (bf16 weights for vdpbf16ps) or 4 (int8 weights for vpdpbusd),
    B_packed[j // cols, k // group, j % cols, k % group]: the weights of a k group sit side by
    side in each 32-bit lane.

    The copy (pad_einsum's pad of B, else a cache_read) is the preprocessing block; its loops write
    the packed panels in order, in parallel over panels.
    """
    stmt = sch.get(block)
    index = next(n for n, read in enumerate(stmt.reads) if len(read.region) == 2 and
                 read.region[1].min.same_as(stmt.iter_vars[-2].var))
    copy = next((p for p in sch.get_producers(block) if _buffer(sch.get(p).reads[0]).same_as(weight)), None)
    if copy is None:
        copy = sch.cache_read(block, index, "global")
    if group > 1:
        sch.transform_layout(block, ("read", index),
                             lambda kk, jj: (jj // cols, kk // group, jj % cols, kk % group))
    else:
        sch.transform_layout(block, ("read", index), lambda kk, jj: (jj // cols, kk, jj % cols))
    k_loop, j_loop = sch.get_loops(copy)
    panel, lane = sch.split(j_loop, [None, cols])
    sch.reorder(panel, k_loop, lane)
    sch.parallel(panel)
    if group == 1:
        sch.vectorize(lane)
    sch.annotate(copy, PREPROC, True)


def _is_bf16(block) -> bool:
    """The reduction reads bf16 bit patterns (uint16), as `pgen.onnx.weights.dense_bf16` writes it."""
    return all(_buffer(r).dtype == "uint16" for r in block.reads)


def _is_int8(block) -> bool:
    """The reduction multiplies uint8 activation codes by int8 weights (`dense_int8`)."""
    return sorted(_buffer(r).dtype for r in block.reads) == ["int8", "uint8"]


def _k_extent(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> int:
    extent = sch.get(block).iter_vars[-1].dom.extent
    return extent.value if isinstance(extent, tirx.IntImm) else 1


def widen_bf16(bits):
    """bfloat16 bits (uint16) -> float32, the high half of the float's bits. `pgen.onnx.weights`
    writes its dense layers with this expression and the tensor intrinsic below matches it."""
    return T.reinterpret("float32", T.shift_left(T.Cast("uint32", bits), T.uint32(16)))


@T.prim_func(s_tir=True)
def _bf16_dot_desc(A: T.Buffer((2,), "uint16", offset_factor=1, align=2),
                   B: T.Buffer((16, 2), "uint16", offset_factor=1, align=2),
                   C: T.Buffer((16,), "float32", offset_factor=1, align=4)) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        for i, k in T.grid(16, 2):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + widen_bf16(A[vk]) * widen_bf16(B[vi, vk])


@T.prim_func(s_tir=True)
def _bf16_dot_impl(A: T.Buffer((2,), "uint16", offset_factor=1, align=2),
                   B: T.Buffer((16, 2), "uint16", offset_factor=1, align=2),
                   C: T.Buffer((16,), "float32", offset_factor=1, align=4)) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        # The pair as one int32 (a uint16x2 reinterpret goes through a stack slot): A's rows have
        # an even length (the k pairs), so a pair starts at an even element.
        pairs = T.decl_buffer((1,), "int32", data=A.data, elem_offset=A.elem_offset // 2)
        C[T.Ramp(0, 1, 16)] = T.call_pure_extern("float32x16", "pgen_dpbf16ps", C.vload([0], "float32x16"),
                                                 T.Broadcast(pairs[0], 16),
                                                 T.reinterpret(B.vload([0, 0], "uint16x32"), dtype="int32x16"))


# NOTE: TVM 0.27 legalizes `bfloat16` vectors to float32 and uint16, so TIR cannot pass LLVM's
# `<32 x bfloat>` to the intrinsic itself: this always-inlined wrapper takes the pairs as i32
# lanes. linkonce_odr: every dense function of a model imports it into one LLVM module.
_DPBF16_LL = """
define linkonce_odr <16 x float> @pgen_dpbf16ps(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) #0 {
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
attributes #0 = { alwaysinline nounwind "target-features"="+avx512bf16,+avx512f" }
"""

BF16_DOT_INTRIN = "pgen_bf16_dot_16x2"
s_tir.TensorIntrin.register(BF16_DOT_INTRIN, _bf16_dot_desc, _bf16_dot_impl, override=True)


@T.prim_func(s_tir=True)
def _int8_dot_desc(A: T.Buffer((4,), "uint8", offset_factor=1, align=1),
                   B: T.Buffer((16, 4), "int8", offset_factor=1, align=1),
                   C: T.Buffer((16,), "int32", offset_factor=1, align=4)) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i, k in T.grid(16, 4):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])


@T.prim_func(s_tir=True)
def _int8_dot_impl(A: T.Buffer((4,), "uint8", offset_factor=1, align=1),
                   B: T.Buffer((16, 4), "int8", offset_factor=1, align=1),
                   C: T.Buffer((16,), "int32", offset_factor=1, align=4)) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # The quad as one int32 (a uint8x4 reinterpret goes through a stack slot): A's rows have a
        # length that is a multiple of 4 (the k quads), so a quad starts at a multiple of 4.
        quads = T.decl_buffer((1,), "int32", data=A.data, elem_offset=A.elem_offset // 4)
        C[T.Ramp(0, 1, 16)] = T.call_pure_extern("int32x16", "pgen_vpdpbusd", C.vload([0], "int32x16"),
                                                 T.Broadcast(quads[0], 16),
                                                 T.reinterpret(B.vload([0, 0], "int8x64"), dtype="int32x16"))


# vpdpbusd: per 32-bit lane, acc + the 4 products of a's unsigned bytes by b's signed bytes.
_DPBUSD_LL = """
define linkonce_odr <16 x i32> @pgen_vpdpbusd(<16 x i32> %acc, <16 x i32> %a, <16 x i32> %b) #0 {
  %x = bitcast <16 x i32> %a to <64 x i8>
  %y = bitcast <16 x i32> %b to <64 x i8>
  %r = call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> %acc, <64 x i8> %x, <64 x i8> %y)
  ret <16 x i32> %r
}
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)
attributes #0 = { alwaysinline nounwind "target-features"="+avx512vnni,+avx512f" }
"""

INT8_DOT_INTRIN = "pgen_int8_dot_16x4"
s_tir.TensorIntrin.register(INT8_DOT_INTRIN, _int8_dot_desc, _int8_dot_impl, override=True)


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


def schedule_act_quant(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The activation quantizer of int8 weights (`pgen.onnx.weights._act_quant_te`): rows in
    parallel, each row's partial maxima, scale and codes computed by the thread of that row, the
    maxima and the codes vectorized over 16 float32 lanes.

    Unscheduled, its loops are scalar (the lane-strided maximum does not vectorize on its own).
    """
    sch = s_tir.Schedule(func)
    part, amax, scale, codes = (sch.get_sblock(n) for n in ("act_amax_part", "act_amax", "act_scale", "act_codes"))
    # scale and codes are both outputs: the row loop is scale's, the codes move under it.
    rows = sch.get_loops(scale)
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    for block in (amax, part):
        sch.compute_at(block, row, preserve_unit_loops=True)
    sch.reverse_compute_at(codes, row, preserve_unit_loops=True)
    k = sch.get_loops(codes)[-1]
    *_, lane, c = sch.get_loops(part)
    sch.reorder(c, lane)
    _, k_lane = sch.split(k, [None, QUANT_VECTOR])
    sch.vectorize(k_lane)
    sch.parallel(row)  # before decompose_reduction: parallel needs whole reduction blocks below it
    init = sch.decompose_reduction(part, c)
    for block in (init, part):
        _vectorize_inner(sch, block)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


QUANT_VECTOR = 16
