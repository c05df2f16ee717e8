"""The CUDA-core attention template (decode and extend) in named stages, and the knobs and check
its two rules (CudaDecodeSimt, CudaExtendSimt) share.

A thread block (CTA) owns `q_tile` query rows of one sequence times the `group` query heads of one
KV head, and one split of that sequence's key range. Threads are laid out as
(tx: head_dim / vector lanes) x (ty: query rows, or in decode groups of `group_rows` rows that one
thread serves from each K/V element it loads) x (tz: key lanes). Each iteration the CTA gathers a
tile of `tz * tokens_per_lane` keys through the block table into shared memory (16-byte loads where
the dtype allows), every (ty, tz) pair scores its keys with a reduction across tx, updates its
online softmax, and accumulates P·V in registers. The tz lanes are merged through shared memory at
the end; split-KV partials (decode) are merged by a second kernel.

The stages read top to bottom: `_body` (grid, buffers, the block's key range) -> `_load_queries`
-> `_fetch_tile` (the first tile) -> per tile `_store_tile`, `_fetch_tile` (the next one),
`_scores`, `_reduce_scores`, `_mask_and_rescale`, `_pv` -> `_merge_lanes`, then the split-KV merge.
Each is TVMScript expanded in place (`base.stage`): it uses the buffers and bindings of the block
it is expanded in and the values `_plan` computes.

NOTE: the reduction across tx runs unconditionally in every thread, with masks applied after it:
a warp-level reduction inside a branch some lanes skip would hang or read garbage.
"""
# ruff: noqa: F821  # stage bodies name the buffers of the block they are expanded in

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T

from pgen_runtime.spec import DTYPE_BYTES, AttentionSpec

from .base import Knob, ScheduleRule, TargetInfo, instantiate
from .cuda_common import NEG, check_limits, score_constants, split_merge


def lane_knobs(spec: AttentionSpec, key_lanes: int) -> tuple[Knob, ...]:
    """The thread layout's knobs, shared by decode and extend (`key_lanes`: the kernel's default)."""
    widest = 16 // DTYPE_BYTES[spec.kv_dtype]
    vec = tuple(v for v in (1, 2, 4, 8) if v <= widest and spec.head_dim % v == 0 and spec.head_dim // v <= 64)
    return (
        Knob("vector", vec, vec[-1]),  # K/V elements per thread and load: 16 bytes where the dtype allows
        Knob("key_lanes", (1, 2, 4, 8), key_lanes),  # threadIdx.z: key lanes scoring a tile side by side
        Knob("tokens_per_lane", (1, 2, 4, 8), 4),  # keys per lane and tile: independent dot products in flight
    )


class SimtRule(ScheduleRule):
    """A variant built from this template (decode or extend): the two differ in knobs only."""

    target_kind = "cuda"

    def supports(self, spec: AttentionSpec, target: TargetInfo) -> str | None:
        if spec.kv_quantized:
            return (f"kv_dtype {spec.kv_dtype} (a quantized KV cache) has CPU kernels only; build for llvm, or "
                    "use a float kv_dtype for CUDA")
        return None

    def check(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]) -> str | None:
        return check(spec, target, config)

    def apply(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]):
        if target.kind != self.target_kind or self.supports(spec, target):
            return None
        return attention(spec, self.kernel == "decode", config)


def check(spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]) -> str | None:
    """Why `config` of either CUDA-core rule cannot run `spec` on `target`, or None."""
    if spec.head_dim % config["vector"] or spec.head_dim // config["vector"] > 64:
        return f"vector {config['vector']} leaves head_dim {spec.head_dim} not in <= 64 lanes"
    rows = config.get("q_tile", 1) * spec.group_size
    if rows % config.get("group_rows", 1):
        return f"group_rows {config['group_rows']} does not divide the {rows} query rows of a block"
    lanes = spec.head_dim // config["vector"]
    if config.get("group_rows", 1) > 1 and (lanes > 32 or lanes & (lanes - 1)):
        # TVM's generic allreduce, unrolled over the rows, fails to lower (duplicate load remap).
        return f"group_rows > 1 needs a warp-shuffle reduction: head_dim / vector = {lanes} lanes"
    threads = lanes * rows // config.get("group_rows", 1) * config["key_lanes"]
    return check_limits(target, threads, shared_bytes(spec, config))


def shared_bytes(spec: AttentionSpec, config: dict[str, Any]) -> int:
    """The K/V tile and the key lanes' partial outputs and softmax states."""
    tile = config["key_lanes"] * config["tokens_per_lane"]
    rows = config.get("q_tile", 1) * spec.group_size
    kv = 2 * tile * spec.head_dim * DTYPE_BYTES[spec.kv_dtype]
    merge = config["key_lanes"] * rows * (spec.head_dim + 2) * 4
    return kv + merge


def attention(spec: AttentionSpec, decode: bool, config: dict[str, Any]):
    """The scheduled decode (`decode`) or extend PrimFunc of `spec` with `config`'s knobs."""
    return instantiate(spec, _plan(spec, decode, config), _STAGES)


def _plan(spec: AttentionSpec, decode: bool, config: dict[str, Any]) -> dict[str, Any]:
    """The template's Python-side values: thread layout, tile shapes and score constants."""
    hkv, d, bs, g = spec.num_kv_heads, spec.head_dim, spec.block_size, spec.group_size
    vec = config["vector"]
    bdx = d // vec
    qt = 1 if decode else config["q_tile"]
    rows = qt * g
    rpt = config.get("group_rows", 1) if decode else 1
    nty = rows // rpt  # threadIdx.y: groups of rpt query rows
    bdz = config["key_lanes"]
    tpz = config["tokens_per_lane"]
    tile = bdz * tpz
    load_iters = (tile + nty * bdz - 1) // (nty * bdz)
    # Reduce the tx lanes by xor-shuffles when they form aligned power-of-two groups of a warp;
    # otherwise TVM's generic allreduce (through shared memory) does it.
    butterfly = bdx & (bdx - 1) == 0 and bdx <= 32
    levels = max(bdx.bit_length() - 1, 1)
    dtype, kv_dtype = spec.dtype, spec.kv_dtype
    has_cap, q_scale, inv_cap, cap_log2e, window = score_constants(spec)
    merge = split_merge(spec, rows)
    return dict(locals())


def _body(q, kv_pool, block_tables, q_indptr, seq_lens, out, num_splits, max_q_tiles, B, NT):
    # Split-KV partials of this call's splits. Extend never splits; its idle merge block still
    # indexes split 0 of sequence 0, so its workspace is one split of one sequence.
    WO = T.alloc_buffer((B * hkv * num_splits * rows * d if decode else rows * d,), "float32")
    WM = T.alloc_buffer((B * hkv * num_splits * rows * 2 if decode else rows * 2,), "float32")
    for bx in T.thread_binding(B * max_q_tiles, thread="blockIdx.x"):
        for by in T.thread_binding(hkv * num_splits, thread="blockIdx.y"):
            for tz in T.thread_binding(bdz, thread="threadIdx.z"):
                for ty in T.thread_binding(nty, thread="threadIdx.y"):
                    for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                        with T.sblock("attn"):
                            T.reads()
                            T.writes()
                            ks = T.sblock_alloc_buffer((tile, d), kv_dtype, scope="shared")
                            vs = T.sblock_alloc_buffer((tile, d), kv_dtype, scope="shared")
                            mo = T.sblock_alloc_buffer((bdz, rows, d), "float32", scope="shared")
                            mml = T.sblock_alloc_buffer((bdz, rows, 2), "float32", scope="shared")
                            ql = T.sblock_alloc_buffer((rpt, vec), "float32", scope="local")
                            ol = T.sblock_alloc_buffer((rpt, vec), "float32", scope="local")
                            pj = T.sblock_alloc_buffer((rpt, tpz), "float32", scope="local")
                            kl = T.sblock_alloc_buffer((vec,), kv_dtype, scope="local")
                            kf = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                            red = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            sc = T.sblock_alloc_buffer((rpt, tpz), "float32", scope="local")
                            st = T.sblock_alloc_buffer((rpt, 3), "float32", scope="local")
                            kr = T.sblock_alloc_buffer((load_iters, vec), kv_dtype, scope="local")
                            vr = T.sblock_alloc_buffer((load_iters, vec), kv_dtype, scope="local")
                            b = bx // max_q_tiles
                            i0 = bx % max_q_tiles * qt
                            h = by // num_splits
                            split = by % num_splits
                            row0 = q_indptr[b]
                            n_new = q_indptr[b + 1] - row0
                            length = seq_lens[b]
                            i1 = T.min(n_new, i0 + qt)
                            # The query token of all of this thread's rows: with group_rows > 1
                            # (decode only, one token per block) they share it.
                            mine = i0 + ty * rpt // g
                            pos = length - n_new + mine
                            k_hi = length - n_new + i1
                            k_lo = T.max(length - n_new + i0 - window + 1, 0)
                            per = T.ceildiv(T.ceildiv(T.max(k_hi - k_lo, 0), num_splits), tile) * tile
                            c_lo = k_lo + split * per
                            c_hi = T.min(k_hi, c_lo + per)
                            # A query-tile slot past this sequence's last tile has nothing to do.
                            n_iter = T.if_then_else(i0 < n_new, T.ceildiv(T.max(c_hi - c_lo, 0), tile), 0)
                            load_queries()
                            fetch_tile(True)
                            for it in T.serial(n_iter):
                                store_tile()
                                T.tvm_storage_sync("shared")
                                fetch_tile(False)
                                for rr in T.unroll(rpt):
                                    st[rr, 2] = st[rr, 0]
                                scores()
                                reduce_scores()
                                mask_and_rescale()
                                pv()
                                T.tvm_storage_sync("shared")
                            merge_lanes()
    merge(WO, WM, out, q_indptr, num_splits, B)


def _load_queries():
    """This thread's q elements, scaled, and fresh softmax states. Row ty * rpt + rr of the
    block: query token i0 + row // g, head h * g + row % g."""
    for rr in T.unroll(rpt):
        st[rr, 0] = T.float32(NEG)
        st[rr, 1] = T.float32(0)
        for v in T.unroll(vec):
            ol[rr, v] = T.float32(0)
            ql[rr, v] = T.cast(q[T.min(row0 + mine, NT - 1), h * g + (ty * rpt + rr) % g, tx * vec + v], "float32") * q_scale


def _fetch_tile(first):
    """The K/V rows of the first tile (`first`), else of the tile after `it`, into registers kr
    and vr: K/V tiles go global -> registers -> shared memory, and the next tile's loads are
    issued before this tile's math, so they are in flight while it runs. Rows past the range
    are zero."""
    for j in T.serial(load_iters):
        row = j * (nty * bdz) + tz * nty + ty
        if first:
            if row < tile and c_lo + row < c_hi:
                load_kv_row(j, c_lo + row)
            else:
                zero_kv_row(j)
        else:
            key = c_lo + (it + 1) * tile + row
            if row < tile and key < c_hi:
                load_kv_row(j, key)
            else:
                zero_kv_row(j)


def _load_kv_row(j, key):
    """This thread's elements of key `key`'s K and V rows, through the block table."""
    for v in T.vectorized(vec):
        kr[j, v] = kv_pool[block_tables[b, key // bs], 0, h, key % bs, tx * vec + v]
    for v in T.vectorized(vec):
        vr[j, v] = kv_pool[block_tables[b, key // bs], 1, h, key % bs, tx * vec + v]


def _zero_kv_row(j):
    for v in T.vectorized(vec):
        kr[j, v] = T.cast(0, kv_dtype)
    for v in T.vectorized(vec):
        vr[j, v] = T.cast(0, kv_dtype)


def _store_tile():
    """The fetched rows into the shared K/V tile."""
    for j in T.serial(load_iters):
        row = j * (nty * bdz) + tz * nty + ty
        if row < tile:
            for v in T.vectorized(vec):
                ks[row, tx * vec + v] = kr[j, v]
            for v in T.vectorized(vec):
                vs[row, tx * vec + v] = vr[j, v]


def _scores():
    """This lane's partial dot products of its keys, all of them first (independent chains);
    each K element is converted once for the thread's rpt rows."""
    for j in T.unroll(tpz):
        for v in T.vectorized(vec):
            kl[v] = ks[tz * tpz + j, tx * vec + v]
        if rpt > 1:
            for v in T.unroll(vec):
                kf[v] = T.cast(kl[v], "float32")
            for rr in T.unroll(rpt):
                pj[rr, j] = T.float32(0)
                for v in T.unroll(vec):
                    pj[rr, j] = pj[rr, j] + ql[rr, v] * kf[v]
        else:
            pj[0, j] = T.float32(0)
            for v in T.unroll(vec):
                pj[0, j] = pj[0, j] + ql[0, v] * T.cast(kl[v], "float32")


def _reduce_scores():
    """The partial dot products summed across tx, interleaved over rows and keys."""
    if butterfly:
        for lv in T.unroll(levels):
            for rr in T.unroll(rpt):
                for j in T.unroll(tpz):
                    pj[rr, j] = pj[rr, j] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), pj[rr, j], (bdx >> 1) >> lv, 32, 32)
    else:
        for rr in T.unroll(rpt):
            for j in T.serial(tpz):
                with T.sblock("score_allreduce"):
                    T.reads(pj[rr, j])
                    T.writes(red[0])
                    T.attr(T.comm_reducer(lambda x, y: x + y, [T.float32(0)]), "reduce_scope", T.int32(0))
                    T.tvm_thread_allreduce(T.uint32(1), pj[rr, j], True, red[0], tx, dtype="void")
                pj[rr, j] = red[0]


def _mask_and_rescale():
    """Logits of the visible keys (NEG elsewhere), the new running max, and the running state
    rescaled to it."""
    for rr in T.unroll(rpt):
        for j in T.unroll(tpz):
            key = c_lo + it * tile + tz * tpz + j
            if (key < c_hi and key <= pos
                    and key > pos - window
                    and mine < i1):
                if has_cap:
                    sc[rr, j] = T.tanh(pj[rr, j] * inv_cap) * cap_log2e
                else:
                    sc[rr, j] = pj[rr, j]
            else:
                sc[rr, j] = T.float32(NEG)
            st[rr, 2] = T.max(st[rr, 2], sc[rr, j])
        st[rr, 1] = st[rr, 1] * T.exp2(st[rr, 0] - st[rr, 2])
        for v in T.unroll(vec):
            ol[rr, v] = ol[rr, v] * T.exp2(st[rr, 0] - st[rr, 2])
        st[rr, 0] = st[rr, 2]


def _pv():
    """The keys' weights added to the running sums and P·V to the outputs; each V element is
    converted once for the thread's rpt rows."""
    for j in T.unroll(tpz):
        for rr in T.unroll(rpt):
            sc[rr, j] = T.if_then_else(sc[rr, j] > T.float32(NEG), T.exp2(sc[rr, j] - st[rr, 0]), T.float32(0))
            st[rr, 1] = st[rr, 1] + sc[rr, j]
        for v in T.vectorized(vec):
            kl[v] = vs[tz * tpz + j, tx * vec + v]
        if rpt > 1:
            for v in T.unroll(vec):
                kf[v] = T.cast(kl[v], "float32")
            for rr in T.unroll(rpt):
                for v in T.unroll(vec):
                    ol[rr, v] = ol[rr, v] + sc[rr, j] * kf[v]
        else:
            for v in T.unroll(vec):
                ol[0, v] = ol[0, v] + sc[0, j] * T.cast(kl[v], "float32")


def _merge_lanes():
    """The key lanes (tz) merged through shared memory; lane 0 writes the rows: the output, or
    without one split the split's partial for the merge kernel."""
    for rr in T.unroll(rpt):
        for v in T.unroll(vec):
            mo[tz, ty * rpt + rr, tx * vec + v] = ol[rr, v]
        mml[tz, ty * rpt + rr, 0] = st[rr, 0]
        mml[tz, ty * rpt + rr, 1] = st[rr, 1]
    T.tvm_storage_sync("shared")
    for rr in T.unroll(rpt):
        st[rr, 2] = T.float32(NEG)
        for z in T.serial(bdz):
            st[rr, 2] = T.max(st[rr, 2], mml[z, ty * rpt + rr, 0])
        st[rr, 1] = T.float32(0)
        for v in T.unroll(vec):
            ol[rr, v] = T.float32(0)
        for z in T.serial(bdz):
            st[rr, 0] = T.exp2(mml[z, ty * rpt + rr, 0] - st[rr, 2])
            st[rr, 1] = st[rr, 1] + mml[z, ty * rpt + rr, 1] * st[rr, 0]
            for v in T.unroll(vec):
                ol[rr, v] = ol[rr, v] + mo[z, ty * rpt + rr, tx * vec + v] * st[rr, 0]
        if tz == 0 and mine < i1:
            if num_splits == 1:
                for v in T.unroll(vec):
                    out[row0 + mine, h * g + (ty * rpt + rr) % g, tx * vec + v] = T.cast(
                        ol[rr, v] / T.max(st[rr, 1], T.float32(1e-30)), dtype)
            else:
                for v in T.unroll(vec):
                    WO[(((b * hkv + h) * num_splits + split) * rows + ty * rpt + rr) * d + tx * vec + v] = ol[rr, v]
                WM[(((b * hkv + h) * num_splits + split) * rows + ty * rpt + rr) * 2] = st[rr, 2]
                WM[(((b * hkv + h) * num_splits + split) * rows + ty * rpt + rr) * 2 + 1] = st[rr, 1]


_STAGES = {
    "body": _body, "load_queries": _load_queries, "fetch_tile": _fetch_tile, "load_kv_row": _load_kv_row,
    "zero_kv_row": _zero_kv_row, "store_tile": _store_tile, "scores": _scores, "reduce_scores": _reduce_scores,
    "mask_and_rescale": _mask_and_rescale, "pv": _pv, "merge_lanes": _merge_lanes,
}
