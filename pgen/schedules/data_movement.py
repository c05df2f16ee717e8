"""The data-movement kernels (cache write, block copy, swap): their loop nests and their rule.

The loop nests are plain TIR (one block, spatial loops, head_dim innermost); the rule schedules
them for CPU and CUDA. Step 1 check: the PrimFunc is one of pgen's data-movement nests (one block, spatial loops, head_dim
innermost). Step 2 normalize: fuse every loop but the innermost. Step 3 schedule: on CPU, parallel
outer and vectorized head_dim; on CUDA, `vector` elements per thread for wide loads and stores.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir
from tvm.script import tirx as T

from pgen_runtime.spec import DTYPE_BYTES, AttentionSpec

from . import kv_codec
from .base import Knob, ScheduleRule, TargetInfo, elem_bytes



def cache_write(spec: AttentionSpec):
    """k, v [T, Hkv, D] -> pool at slot_mapping[t] (block * block_size + offset); slot < 0 skips."""
    hkv, d, bs, dtype, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.block_size, spec.dtype, spec.kv_dtype

    @T.prim_func(s_tir=True)
    def func(k_h: T.handle, v_h: T.handle, pool_h: T.handle, slots_h: T.handle):
        NT = T.int32()
        NB = T.int64()
        k = T.match_buffer(k_h, (NT, hkv, d), dtype, align=elem_bytes(dtype))
        v = T.match_buffer(v_h, (NT, hkv, d), dtype, align=elem_bytes(dtype))
        kv_pool = T.match_buffer(pool_h, (NB, T.int64(2), T.int64(hkv), T.int64(bs), T.int64(d)), kv_dtype, align=elem_bytes(kv_dtype))
        slot_mapping = T.match_buffer(slots_h, (NT,), "int32", align=4)
        for t, c, h, x in T.grid(NT, 2, hkv, d):
            with T.sblock("write"):
                vt, vc, vh, vx = T.axis.remap("SSSS", [t, c, h, x])
                T.reads(slot_mapping[vt], k[vt, vh, vx], v[vt, vh, vx])
                T.writes(kv_pool[slot_mapping[vt] // bs, vc, vh, slot_mapping[vt] % bs, vx])
                if slot_mapping[vt] >= 0:
                    kv_pool[slot_mapping[vt] // bs, vc, vh, slot_mapping[vt] % bs, vx] = T.cast(
                        T.if_then_else(vc == 0, k[vt, vh, vx], v[vt, vh, vx]), kv_dtype
                    )

    return func


def cache_write_quantized(spec: AttentionSpec, lanes: int):
    """cache_write for a quantized pool (CPU): each (token, K/V, head) row gets its scale and codes
    (`kv_codec`); one task per row, `lanes` elements per vector step."""
    hkv, d, bs, rows, dtype = spec.num_kv_heads, spec.head_dim, spec.block_size, spec.pool_rows, spec.dtype
    code, top, words = spec.kv_storage_dtype, kv_codec.qmax(spec), 2 * hkv * kv_codec.scale_words(spec)
    steps = d // lanes

    @T.prim_func(s_tir=True)
    def func(k_h: T.handle, v_h: T.handle, pool_h: T.handle, slots_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        NT = T.int32()
        NB = T.int64()
        k = T.match_buffer(k_h, (NT, hkv, d), dtype, align=elem_bytes(dtype))
        v = T.match_buffer(v_h, (NT, hkv, d), dtype, align=elem_bytes(dtype))
        kv_pool = T.match_buffer(pool_h, (NB, T.int64(2), T.int64(hkv), T.int64(rows), T.int64(d)), code, align=1)
        slot_mapping = T.match_buffer(slots_h, (NT,), "int32", align=4)
        kv_scales = T.decl_buffer((NB * words,), "float32", data=kv_pool.data)
        for task in T.parallel(NT * 2 * hkv):
            with T.sblock("quantize"):
                T.reads()
                T.writes()
                row = T.sblock_alloc_buffer((d,), "float32")
                part = T.sblock_alloc_buffer((lanes,), "float32")
                amax = T.sblock_alloc_buffer((1,), "float32")
                t = task // (2 * hkv)
                c = task // hkv % 2
                h = task % hkv
                slot = slot_mapping[t]
                if slot >= 0:
                    for x in T.serial(steps):
                        for ln in T.vectorized(lanes):
                            row[x * lanes + ln] = T.cast(T.if_then_else(c == 0, k[t, h, x * lanes + ln], v[t, h, x * lanes + ln]), "float32")
                    for ln in T.vectorized(lanes):
                        part[ln] = T.float32(0)
                    for x in T.serial(steps):
                        for ln in T.vectorized(lanes):
                            part[ln] = T.max(part[ln], T.fabs(row[x * lanes + ln]))
                    amax[0] = T.float32(0)
                    for ln in T.serial(lanes):
                        amax[0] = T.max(amax[0], part[ln])
                    inv = T.Select(amax[0] > T.float32(0), T.float32(top) / amax[0], T.float32(0))
                    kv_scales[kv_codec.scale_index(spec, slot // bs, c, h, slot % bs)] = amax[0] / T.float32(top)
                    for x in T.serial(steps):
                        for ln in T.vectorized(lanes):
                            kv_pool[slot // bs, c, h, kv_codec.code_row(spec, c, slot % bs, x * lanes + ln),
                                    kv_codec.code_col(spec, c, slot % bs, x * lanes + ln)] = kv_codec.encode(
                                spec, T.min(T.max(row[x * lanes + ln] * inv, T.float32(-top)), T.float32(top)))

    return func


def copy_blocks(spec: AttentionSpec):
    """pool[pairs[p, 1]] = pool[pairs[p, 0]] for every pair (copy-on-write)."""
    hkv, d, bs, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.pool_rows, spec.kv_storage_dtype

    @T.prim_func(s_tir=True)
    def func(pool_h: T.handle, pairs_h: T.handle):
        NB = T.int64()
        NP = T.int32()
        kv_pool = T.match_buffer(pool_h, (NB, T.int64(2), T.int64(hkv), T.int64(bs), T.int64(d)), kv_dtype, align=elem_bytes(kv_dtype))
        pairs = T.match_buffer(pairs_h, (NP, 2), "int32", align=4)
        for p, c, h, t, x in T.grid(NP, 2, hkv, bs, d):
            with T.sblock("copy"):
                vp, vc, vh, vt, vx = T.axis.remap("SSSSS", [p, c, h, t, x])
                # NOTE: reads and writes share the pool; declaring only the table as read keeps
                # the block "complete" for scheduling. The caller guarantees no destination is
                # also a source, so the iterations are independent.
                T.reads(pairs[vp, 0:2])
                T.writes(kv_pool[pairs[vp, 1], vc, vh, vt, vx])
                kv_pool[pairs[vp, 1], vc, vh, vt, vx] = kv_pool[pairs[vp, 0], vc, vh, vt, vx]

    return func


def swap_out(spec: AttentionSpec):
    """buf[i] = pool[block_ids[i]]: gather blocks into one contiguous buffer."""
    hkv, d, bs, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.pool_rows, spec.kv_storage_dtype

    @T.prim_func(s_tir=True)
    def func(pool_h: T.handle, ids_h: T.handle, buf_h: T.handle):
        NB = T.int64()
        N = T.int32()
        kv_pool = T.match_buffer(pool_h, (NB, T.int64(2), T.int64(hkv), T.int64(bs), T.int64(d)), kv_dtype, align=elem_bytes(kv_dtype))
        block_ids = T.match_buffer(ids_h, (N,), "int32", align=4)
        buf = T.match_buffer(buf_h, (N, 2, hkv, bs, d), kv_dtype, align=elem_bytes(kv_dtype))
        for i, c, h, t, x in T.grid(N, 2, hkv, bs, d):
            with T.sblock("gather"):
                vi, vc, vh, vt, vx = T.axis.remap("SSSSS", [i, c, h, t, x])
                buf[vi, vc, vh, vt, vx] = kv_pool[block_ids[vi], vc, vh, vt, vx]

    return func


def swap_in(spec: AttentionSpec):
    """pool[block_ids[i]] = buf[i]: scatter a contiguous buffer back into the pool."""
    hkv, d, bs, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.pool_rows, spec.kv_storage_dtype

    @T.prim_func(s_tir=True)
    def func(buf_h: T.handle, ids_h: T.handle, pool_h: T.handle):
        NB = T.int64()
        N = T.int32()
        buf = T.match_buffer(buf_h, (N, 2, hkv, bs, d), kv_dtype, align=elem_bytes(kv_dtype))
        block_ids = T.match_buffer(ids_h, (N,), "int32", align=4)
        kv_pool = T.match_buffer(pool_h, (NB, T.int64(2), T.int64(hkv), T.int64(bs), T.int64(d)), kv_dtype, align=elem_bytes(kv_dtype))
        for i, c, h, t, x in T.grid(N, 2, hkv, bs, d):
            with T.sblock("scatter"):
                vi, vc, vh, vt, vx = T.axis.remap("SSSSS", [i, c, h, t, x])
                kv_pool[block_ids[vi], vc, vh, vt, vx] = buf[vi, vc, vh, vt, vx]

    return func


DATA_MOVEMENT = {
    "cache_write": cache_write,
    "copy_blocks": copy_blocks,
    "swap_out": swap_out,
    "swap_in": swap_in,
}

class DataMovement(ScheduleRule):
    """Schedules `DATA_MOVEMENT[kernel](spec)` for one target kind."""

    def __init__(self, kernel: str, target_kind: str) -> None:
        self.kernel = kernel
        self.target_kind = target_kind

    def supports(self, spec: AttentionSpec, target: TargetInfo) -> str | None:
        if spec.kv_quantized and self.target_kind == "cuda":
            return (f"kv_dtype {spec.kv_dtype} (a quantized KV cache) has CPU kernels only; build for llvm, or "
                    "use a float kv_dtype for CUDA")
        return None

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        if self.target_kind == "cuda":
            vec = tuple(v for v in (1, 2, 4, 8) if spec.head_dim % v == 0 and v * DTYPE_BYTES[spec.kv_storage_dtype] <= 16)
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
        if target.kind != self.target_kind or self.kernel not in DATA_MOVEMENT or self.supports(spec, target):
            return None
        if self.kernel == "cache_write" and spec.kv_quantized:
            return cache_write_quantized(spec, config["vector"])
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
