"""Lowering: spec -> the unscheduled TIR of each data-movement kernel, and the kernel catalogue.

Data-movement kernels (cache write, block copy, swap) are plain loop nests here; a rule in
`schedules/` binds them to threads or vectorizes them. Attention (decode, extend) is written as a
schedule template instead, as TVM's own paged kernels are: its online softmax and block-table
gather do not come out of a generic schedule.
"""

from __future__ import annotations

from tvm.script import tirx as T

from pgen_runtime.spec import AttentionSpec

from .schedules.base import elem_bytes

# Every kernel a package holds, in the order the manifest lists them.
KERNELS = ("decode", "extend", "cache_write", "copy_blocks", "swap_out", "swap_in")


def cache_write(spec: AttentionSpec):
    """k, v [T, Hkv, D] -> pool at slot_mapping[t] (block * block_size + offset); slot < 0 skips."""
    hkv, d, bs, dtype, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.block_size, spec.dtype, spec.kv_dtype

    @T.prim_func(s_tir=True)
    def func(k_h: T.handle, v_h: T.handle, pool_h: T.handle, slots_h: T.handle):
        NT = T.int32()
        NB = T.int32()
        k = T.match_buffer(k_h, (NT, hkv, d), dtype, align=elem_bytes(dtype))
        v = T.match_buffer(v_h, (NT, hkv, d), dtype, align=elem_bytes(dtype))
        kv_pool = T.match_buffer(pool_h, (NB, 2, hkv, bs, d), kv_dtype, align=elem_bytes(kv_dtype))
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


def copy_blocks(spec: AttentionSpec):
    """pool[pairs[p, 1]] = pool[pairs[p, 0]] for every pair (copy-on-write)."""
    hkv, d, bs, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.block_size, spec.kv_dtype

    @T.prim_func(s_tir=True)
    def func(pool_h: T.handle, pairs_h: T.handle):
        NB = T.int32()
        NP = T.int32()
        kv_pool = T.match_buffer(pool_h, (NB, 2, hkv, bs, d), kv_dtype, align=elem_bytes(kv_dtype))
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
    hkv, d, bs, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.block_size, spec.kv_dtype

    @T.prim_func(s_tir=True)
    def func(pool_h: T.handle, ids_h: T.handle, buf_h: T.handle):
        NB = T.int32()
        N = T.int32()
        kv_pool = T.match_buffer(pool_h, (NB, 2, hkv, bs, d), kv_dtype, align=elem_bytes(kv_dtype))
        block_ids = T.match_buffer(ids_h, (N,), "int32", align=4)
        buf = T.match_buffer(buf_h, (N, 2, hkv, bs, d), kv_dtype, align=elem_bytes(kv_dtype))
        for i, c, h, t, x in T.grid(N, 2, hkv, bs, d):
            with T.sblock("gather"):
                vi, vc, vh, vt, vx = T.axis.remap("SSSSS", [i, c, h, t, x])
                buf[vi, vc, vh, vt, vx] = kv_pool[block_ids[vi], vc, vh, vt, vx]

    return func


def swap_in(spec: AttentionSpec):
    """pool[block_ids[i]] = buf[i]: scatter a contiguous buffer back into the pool."""
    hkv, d, bs, kv_dtype = spec.num_kv_heads, spec.head_dim, spec.block_size, spec.kv_dtype

    @T.prim_func(s_tir=True)
    def func(buf_h: T.handle, ids_h: T.handle, pool_h: T.handle):
        NB = T.int32()
        N = T.int32()
        buf = T.match_buffer(buf_h, (N, 2, hkv, bs, d), kv_dtype, align=elem_bytes(kv_dtype))
        block_ids = T.match_buffer(ids_h, (N,), "int32", align=4)
        kv_pool = T.match_buffer(pool_h, (NB, 2, hkv, bs, d), kv_dtype, align=elem_bytes(kv_dtype))
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
