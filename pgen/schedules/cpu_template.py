"""The CPU (LLVM) attention template: decode and extend from one loop nest, in named stages.

A task owns `q_tile` query rows of one sequence times the `group` query heads that share one KV
head, so every K/V row it reads from the pool serves the whole GQA group. Keys are visited one
pool block at a time: scores for the block (one of the QK loops), an online-softmax update, then
P·V. Long contexts are split across tasks (flash-decoding) and merged through a float32 workspace.

The stages read top to bottom: `_body` (the parallel task loop) -> `_task_range` -> `_load_queries`
-> `_block_loop` (-> `_qk_per_key` | `_qk_transposed` | `_qk_key_group` | `_qk_int8_lanes` |
`_qk_quads`, `_softmax`, `_pv` | `_pv_int8` | `_pv_quads`) -> `_store_rows`, then `_merge_splits`.
An int8 pool's interleaved codes (spec.KV_LAYOUT_INT8) are read by the int8 loops (VNNI dots) or
the quads loops (float32); the others read rows of contiguous dims through `kv_codec.code_loader`.
Each is TVMScript expanded in place (`base.stage`): it uses
the buffers of the block it is expanded in and the values `_plan` computes.

NOTE: rows past a sequence's length, and slots of unused blocks, may hold anything (tests poison
them with NaN). The key loop therefore never reads a row outside the union of the task's valid
ranges, and per-row masks select before anything is accumulated: 0 * NaN would still be NaN.
"""
# ruff: noqa: F821  # stage bodies name the buffers of the block they are expanded in

from __future__ import annotations

import math
from typing import Any

from tvm.script import tirx as T

from pgen_runtime.spec import AttentionSpec

from .base import Knob, TargetInfo, elem_bytes, instantiate
from .fast_math import fast_exp2
from .kv_codec import code_loader, row_scaler, scale_index

LOG2E = math.log2(math.e)
NEG = -3.0e38


def attention(spec: AttentionSpec, decode: bool, config: dict[str, Any]):
    """The scheduled decode (`decode`) or extend PrimFunc of `spec` with `config`'s knobs."""
    return instantiate(spec, _plan(spec, decode, config), _STAGES, index64=True)


def _merge(a, b, lanes: int, level: int):
    """One level of a transposed lane reduction of two vectors, keeping key order.

    `a` and `b` hold segments of 2w lanes, one segment per key (a's keys before b's); the result
    holds the same keys in order, each summed down to w = lanes >> (level + 1) lanes. From one
    vector of partial products per key, levels 0 .. log2(lanes) - 1 leave one lane per key.
    """
    w = lanes >> (level + 1)
    segs = range(lanes // (2 * w))
    lo = [src + s * 2 * w + i for src in (0, lanes) for s in segs for i in range(w)]
    hi = [i + w for i in lo]
    return T.Shuffle([a, b], lo) + T.Shuffle([a, b], hi)


def _merge_rows(part, rows: int, lanes: int):
    """One vector of the `rows` (a power of two) rows' partial-product vectors of `part`, row r
    summed down to the lanes [r * lanes / rows, (r + 1) * lanes / rows) by `_merge` levels."""
    return _merge_all([part[r, T.Ramp(0, 1, lanes)] for r in range(rows)], lanes)


def _merge_all(vecs, lanes: int):
    """One vector of n (a power of two, at most `lanes`) partial-product vectors, vector i summed
    down to the lanes [i * lanes / n, (i + 1) * lanes / n) by `_merge` levels."""
    level = 0
    while len(vecs) > 1:
        vecs = [_merge(vecs[2 * i], vecs[2 * i + 1], lanes, level) for i in range(len(vecs) // 2)]
        level += 1
    return vecs[0]


def repeat4(x, lanes: int):
    """A 4-lane vector x repeated to `lanes` lanes (vbroadcastf32x4 from memory)."""
    return T.Shuffle([x] * (lanes // 4), [i % 4 for i in range(lanes)])


def broadcast4(codes):
    """64 bytes: the 4 one-byte `codes` repeated in each 32-bit lane (vpdpbusd's operand type)."""
    return T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", codes), 16))


def _butterfly(x, lanes: int, step: int):
    """x plus x with lanes i and i ^ step swapped: one level of a sum within aligned lane groups."""
    return x + T.Shuffle([x], [i ^ step for i in range(lanes)])


def decode_rows(group: int) -> int:
    """Query rows of a decode task per KV head: the GQA group, padded up to a power of two where
    that adds at most a third (7 -> 8, 6 -> 8, 3 -> 4). A padded row belongs to no query token (row
    // group is past the task's one token), so every score of it is masked and nothing of it is
    written; it makes the tile a power of two, which the row-merged lane sums and the key-group
    loop need."""
    padded = 1 << (group - 1).bit_length()
    return padded if padded <= 8 and 3 * padded <= 4 * group else group


def row_tile(rows: int, most: int = 8) -> int:
    """Query rows processed together: the largest divisor of `rows` up to `most`."""
    return max(r for r in range(1, min(rows, most) + 1) if rows % r == 0)



def _plan(spec: AttentionSpec, decode: bool, config: dict[str, Any]) -> dict[str, Any]:
    """The template's Python-side values for `spec` and `config`: tile shapes, knob choices, mask
    constants and expression builders. The stages below see every name defined here."""
    hq, hkv, d, bs, g = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.block_size, spec.group_size
    vl = config["vector_lanes"]
    nd = d // vl
    qt = 1 if decode else config["q_tile"]
    smax = config.get("max_splits", 1)  # decode's workspace holds this many splits; extend's the call's
    rows = decode_rows(g) if decode else qt * g
    hpt = config["kv_heads_per_task"]
    # NOTE: extend takes at most 4 rows per tile by default: 8 spill registers (the Llama prefill
    # took 44 ms with 8, 34.5 ms with 4) and waste more rows where a sequence has one new token.
    rtile = config.get("row_tile") or row_tile(rows, 8 if decode else config.get("row_tile_max", 4))
    # P·V register tile: rtile rows x cgrp vectors, at most half the vector registers, kept in two
    # halves of at most 512 bytes each (see the NOTE at the P·V loop).
    regs = 16 if vl * 32 >= 512 else 8
    cgrp = max(c for c in range(1, nd + 1) if nd % c == 0 and (rtile * c <= regs or c == 1) and rtile * ((c + 1) // 2) * vl * 4 <= 512)
    hc = (cgrp + 1) // 2
    # Transposed QK (qk_transpose): scores of vector_lanes keys at once. Keys go in groups of `kg`,
    # their partial-product vectors in registers and each q vector loaded once for the group;
    # shuffle levels (_merge) leave one lane per key, and group results meet in a binary counter
    # (g0, g1, g2). It saves the per-key lane sums, so it wins where the blocks come from cache:
    # a 2k-token prefill ran 6-15% faster (before the tile order below spread prefill over the
    # threads), decode with its blocks in L2 up to 13%. Where they come
    # from L3 or DRAM it loses, so the per-key loop is the default and the tuner chooses: decode
    # from DRAM no faster (32x4096, 8x16k), decode with blocks in L3 -12%, and extend steps of one
    # token per sequence (the engine's decode step) 13-26% slower (32x4096, 8x512, fp16). Making
    # it a runtime choice per task inside one kernel slowed both loops.
    qk_t = bool(config.get("qk_transpose", 0)) and bs % vl == 0
    # int8 KV: scores as integer dot products (AVX-512 VNNI vpdpbusd, 64 byte products per
    # instruction against 16 FMAs), one lane per key of the interleaved K (`_qk_int8_lanes`): each
    # query row quantized to int8 once per task (without it the quads loop scores the same int8
    # queries in float32). See int8_dot_supported.
    qk_i8 = bool(config.get("qk_int8", 0)) and vl == 16 and bs % 16 == 0 and spec.kv_dtype == "int8"
    # int8 KV, P·V as integer dots too (pv_int8): per row and block, the weights P times V's row
    # scales are rounded to u8 codes of the block's largest / 255, and 4 keys' weights (one 32-bit
    # broadcast) times 16 dims' 4 V codes (one load of the interleaved V) are one vpdpbusd; each
    # block's int32 sums are scaled into the float32 accumulators. It adds the weights' rounding
    # (at most half a code, 1/510 of the block's largest weight, per weight) to the error.
    pv_i8 = bool(config.get("pv_int8", 0)) and vl == 16 and bs % 4 == 0 and spec.kv_dtype == "int8"
    slab = spec.pool_rows * d  # bytes of one (block, K/V, head) slab of a quantized pool

    def slab_start(blk, c, h):
        """Index in kv_bytes (int64: a pool may hold more than 2^31 bytes) of slab (blk, c, h)."""
        return ((T.Cast("int64", blk) * 2 + c) * hkv + h) * slab
    # An int8 pool's interleaved codes without the VNNI loops: QK in vectors of m4 = vl / 4 keys x 4
    # dims (one load), P·V in vectors of vl / 4 dims x 4 keys (`_qk_quads`, `_pv_quads`). The other
    # QK loops read rows of contiguous dims, which this layout does not have.
    m4 = max(vl // 4, 1)
    qk_q4 = spec.kv_dtype == "int8" and not qk_i8 and bs % m4 == 0
    pv_q4 = spec.kv_dtype == "int8" and not pv_i8 and bs % 4 == 0
    q4_level = (vl.bit_length() - 1) - 2  # the _merge level that sums 4 adjacent lanes to 2
    # qk_int8 also requests the scale rows of the block `ahead` on (K's and V's, at its first chunk).
    pf_scales = bool(config.get("prefetch", 1)) and bool(config.get("prefetch_scales", 0))
    i8_step = max(d // 4 // 16, 1)  # qk_int8: dims' steps between two keys' memory requests
    i8_kps = -(-16 // (d // 4 // i8_step))  # and keys per such step
    # NOTE: an int8 cache always scores int8 queries (pgen_runtime.reference.int8_queries), with
    # VNNI or without, so results do not depend on the host or this knob.
    q_i8 = spec.kv_dtype == "int8"
    chains = config.get("qk_chains", 1)  # accumulators per row in the key-by-key QK loop
    xrow = bool(config.get("qk_row_merge", 0)) and rtile in (2, 4, 8) and vl >= rtile
    seg = vl // rtile if xrow else 1
    # Key groups (qk_key_group): scores of `kq` keys x rtile rows at once, one accumulator vector
    # each (rtile x kq = vector_lanes of them), the head dimension in the outer loop so each q
    # vector is loaded once per group, and all rtile x kq lane sums reduced together into one
    # vector; rtile such vectors (one vector_lanes chunk of keys) are transposed into row vectors.
    qkg = bool(config.get("qk_key_group", 0)) and not qk_t and rtile in (1, 2, 4, 8) and vl >= rtile and bs % vl == 0
    if spec.kv_dtype == "int8":  # its K has no rows of contiguous dims: qk_int8 or the quads loop
        qk_t = qkg = False
    kq = vl // rtile
    kh = max(kq // 2, 1)
    kg = min(4 if rtile <= 4 else 2, vl)
    hk = kg // 2
    l0 = kg.bit_length() - 1
    nlev = (vl.bit_length() - 1) - l0
    ngrp = vl // kg
    touch_v = bool(config.get("touch_v", 0))
    streams = config.get("kv_streams", 1) if decode else 1
    # P·V prefetches the next head's K rows (1) or K and V rows (2).
    pf_head = bool(config.get("prefetch_next_head", 0))
    pf_kinds = 2 if config.get("prefetch_next_head", 0) == 2 else 1
    half = (vl // 2, max(vl // 4, 1), max(vl // 8, 1))  # lane counts of the tree sum's levels
    prefetch = bool(config.get("prefetch", 1))
    per_line = 64 // elem_bytes(spec.kv_storage_dtype)  # elements of one 64-byte cache line
    # A pool element as float32 before its row's scale, and the row scale (int8/fp8 KV), which QK
    # applies to each score and P·V to each weight: once per row, not per element.
    kv_code, row_scaled = code_loader(spec), row_scaler(spec)
    lines = max(d // per_line, 1)
    line_step = max(nd // lines, 1)  # head-dimension vectors per cache line of a row
    # P·V makes nd / cgrp passes over the block's V rows; each requests its share of the lines of
    # the next head's rows (all of them in the first pass when they do not divide evenly).
    passes = nd // cgrp
    k_lines_q4 = lines // nd if lines % nd == 0 else lines  # _pv_quads' share of the next head's lines per pass
    k_lines = lines // passes if lines % passes == 0 else lines
    locality = config.get("prefetch_locality", 2)
    head_locality = config.get("prefetch_head_locality", locality)
    ahead = config.get("prefetch_ahead", 1)
    dtype = spec.dtype
    cap = spec.logit_softcap
    # Scores live in log2 units so the softmax uses exp2. With a soft-cap the scale is applied
    # inside tanh and log2(e) after it.
    q_scale = spec.scale if cap is not None else spec.scale * LOG2E
    has_window = spec.sliding_window is not None
    # Without a window every earlier key is visible: a bound no position reaches.
    window_or_inf = spec.sliding_window if has_window else 1 << 30
    has_cap = cap is not None
    inv_cap = 1.0 / cap if has_cap else 1.0
    cap_log2e = cap * LOG2E if has_cap else 1.0

    def capped(x):
        """A score in log2 units, soft-capped where the spec asks for it."""
        return T.tanh(x * inv_cap) * cap_log2e if has_cap else x

    def visible(key, row, length, n_new, i0, i1):
        """Whether the key at position `key` is visible to row `row` of the task's query rows (from
        i0, `g` rows per query token): the row's token is one of the tile's, and the key is at or
        before its position and inside the window. Every QK loop masks its scores with this."""
        pos = length[0] - n_new[0] + i0[0] + row // g
        return T.And(T.And(key <= pos, i0[0] + row // g < i1[0]), key > pos - window_or_inf)


    def partial_at(seq, kv_head, row, token, split, num_splits):
        """Where a row's split-KV partial goes: decode by (sequence, KV head, split, row of the
        group tile), extend by (token row, query head, split)."""
        if decode:
            return ((seq * hkv + kv_head) * smax + split) * rows + row
        return (token * hq + kv_head * g + row % g) * num_splits + split


    return dict(locals())

def _key_loads(t, next_block, ahead, locality, lo, n):
    """Memory requests issued beside key t's scores, for the cache lines [lo, lo + n) of its rows,
    in every QK loop. Other names resolve in the "rows" block (hence the noqa: F821);
    `next_block`, `ahead` and `locality` (the prefetch knobs) are arguments because the call
    site does not see them otherwise."""
    if next_block and rt == 0 and cur[0] + ahead < cur[1]:  # noqa: F821
        # Later blocks of this head are elsewhere in the pool, and hardware prefetchers stop at
        # page boundaries: request row t of the block `ahead` on now, a few lines per key, into
        # L2. (With `ahead` > 1 the task's first blocks after the first get no such request.)
        for kv, ln in T.grid(2, n):
            T.evaluate(T.call_llvm_intrin(
                "void", "llvm.prefetch.p0",
                T.address_of(kv_pool[block_tables[b[0], cur[0] + ahead], kv, h0[0] + hh, t, (lo + ln) * per_line]),  # noqa: F821
                T.int32(0), T.int32(locality), T.int32(1)))
    if touch_v and rt == 0:  # noqa: F821
        # NOTE: one demand load per cache line of this key's V row, so the V rows stream in
        # beside the K rows, many lines in flight. P·V then reads them from cache in column
        # strips; left to the prefetch of the previous block alone, its first strip missed
        # (decode at 32x4096 fp32: +7-10% with these loads; prefetch instructions in their
        # place gained nothing).
        for ln in T.unroll(n):
            touch[0] = T.max(touch[0], T.cast(kv_pool[page[0], 1, h0[0] + hh, t, (lo + ln) * per_line], "float32"))  # noqa: F821

def _tree_reduce(buf, r, is_max, width):
    """Row r of buf[:, :width] (a power of two) reduced (max, else sum) into buf[r, 0], pairwise
    in vectors: one level, then the macro again on the half (expanded as TVMScript is parsed)."""
    if width > 1:
        for v in T.vectorized(width // 2):
            buf[r, v] = T.max(buf[r, v], buf[r, v + width // 2]) if is_max else buf[r, v] + buf[r, v + width // 2]
        tree_reduce(buf, r, is_max, width // 2)

def _body(q, kv_pool, block_tables, q_indptr, seq_lens, out, num_splits, max_q_tiles, B, NT):
    # Split-KV partials: accumulators (WO), running max and sum (WM), indexed by `partial_at`. Extend's
    # hold the call's splits of every token row, and one element when it does not split.
    WO = T.alloc_buffer((B * hkv * smax * rows * d if decode else NT * hq * d * num_splits * T.min(num_splits - 1, 1) + 1,),
                        "float32")
    WM = T.alloc_buffer((B * hkv * smax * rows * 2 if decode else NT * hq * 2 * num_splits * T.min(num_splits - 1, 1) + 1,),
                        "float32")
    # One slot per task that keeps the touch loads (below) alive.
    WT = T.alloc_buffer((B * (hkv // hpt) * max_q_tiles * num_splits if touch_v else 1,), "float32")
    for task in T.parallel(B * (hkv // hpt) * max_q_tiles * num_splits):
        with T.sblock("attn"):
            T.reads()
            T.writes()
            # NOTE: scalars are 1-element buffers, not `x = ...` bindings: TVM 0.27 gives each
            # binding a 4-byte heap workspace inside a parallel task, and loads through those
            # pointers may alias every store, so LLVM could keep nothing in registers.
            item = T.sblock_alloc_buffer((4,), "int32")  # work item; items left, task, bit
            split = T.sblock_alloc_buffer((1,), "int32")
            qtile = T.sblock_alloc_buffer((1,), "int32")
            h0 = T.sblock_alloc_buffer((1,), "int32")
            b = T.sblock_alloc_buffer((1,), "int32")
            row0 = T.sblock_alloc_buffer((1,), "int32")
            n_new = T.sblock_alloc_buffer((1,), "int32")
            length = T.sblock_alloc_buffer((1,), "int32")
            i0 = T.sblock_alloc_buffer((1,), "int32")
            i1 = T.sblock_alloc_buffer((1,), "int32")
            k_hi = T.sblock_alloc_buffer((1,), "int32")
            k_lo = T.sblock_alloc_buffer((1,), "int32")
            nblk = T.sblock_alloc_buffer((1,), "int32")
            per = T.sblock_alloc_buffer((1,), "int32")
            blk_lo = T.sblock_alloc_buffer((1,), "int32")
            blk_hi = T.sblock_alloc_buffer((1,), "int32")
            run_len = T.sblock_alloc_buffer((1,), "int32")
            qf = T.sblock_alloc_buffer((hpt * rows, d), "float32")
            qw = T.sblock_alloc_buffer((hpt * rows if q_i8 else 1, d), "int8")  # int8 query codes
            # _qk_quads' query rows: 4 dims at a time, repeated to a vector (one FMA operand each)
            q4 = T.sblock_alloc_buffer((hpt * rows if qk_q4 else 1, d // 4 * vl if qk_q4 else 1), "float32")
            qsc = T.sblock_alloc_buffer((hpt * rows if q_i8 else 1, 3), "float32")  # their scale, 128 * sum, 1 / scale
            acc = T.sblock_alloc_buffer((hpt * rows, d), "float32")
            mrow = T.sblock_alloc_buffer((hpt * rows,), "float32")
            lrow = T.sblock_alloc_buffer((hpt * rows,), "float32")
            # NOTE: the parallel loop hands each thread a contiguous run of tasks, and work per
            # task varies: in causal order the last query tiles of a prefill cost the most, and
            # in a mixed step (prefill chunks beside one-token sequences, which leave most of
            # their max_q_tiles slots empty) the prefill's tasks came first. So task numbers map
            # to work items by a recursive even/odd split (bit reversal for any count), under
            # which any contiguous run of tasks covers items spread evenly over the range, and
            # extend's items are only the non-empty tiles, numbered sequence by sequence: a
            # thread gets every other tile of each prefill and every other one-token row. A
            # mixed step, 2 x 128 new tokens at 1k beside 32 x 1 at 4k (Llama-3-8B shape, 2
            # threads), took 45.4 ms against 29.4 ms for its parts run apart (fp16; fp32 61.9
            # vs 53.3) while tasks were taken in order.
            task_range()
            if i0[0] < n_new[0]:
                load_queries()
                block_loop()
                store_rows()
    merge_splits()

def _task_range():
    """The task's work item (sequence, KV heads, query tile, split) and its key range [k_lo, k_hi)
    in blocks [blk_lo, blk_hi)."""
    item[0] = 0
    item[1] = B * (hkv // hpt) * max_q_tiles * num_splits
    item[2] = task
    item[3] = 1
    for _lvl in T.serial(31):
        if item[1] > 1:
            if item[2] < (item[1] + 1) // 2:
                item[1] = (item[1] + 1) // 2
            else:
                item[2] = item[2] - (item[1] + 1) // 2
                item[1] = item[1] // 2
                item[0] = item[0] + item[3]
            item[3] = item[3] * 2
    split[0] = item[0] % num_splits
    h0[0] = item[0] // num_splits % (hkv // hpt) * hpt
    if decode:
        qtile[0] = item[0] // (num_splits * (hkv // hpt)) % max_q_tiles
        b[0] = item[0] // (num_splits * (hkv // hpt) * max_q_tiles)
    else:
        # Tile number item // (splits x head groups) among the non-empty tiles: find
        # its sequence (tiles counted in `item[1]`). Items past the last tile get the
        # last sequence's first tile past its end: no work. So the launch needs only
        # B x max_q_tiles >= all tiles (the runtime passes the least such max_q_tiles,
        # not the longest sequence's tile count: fewer empty tasks, each scanning B).
        item[1] = 0
        item[2] = item[0] // (num_splits * (hkv // hpt))
        b[0] = B
        qtile[0] = 0
        for bb in T.serial(B):
            if b[0] == B:
                if item[2] < item[1] + T.ceildiv(q_indptr[bb + 1] - q_indptr[bb], qt):
                    b[0] = bb
                    qtile[0] = item[2] - item[1]
                item[1] = item[1] + T.ceildiv(q_indptr[bb + 1] - q_indptr[bb], qt)
        if b[0] == B:
            b[0] = B - 1
            qtile[0] = T.ceildiv(q_indptr[B] - q_indptr[B - 1], qt)
    row0[0] = q_indptr[b[0]]
    n_new[0] = q_indptr[b[0] + 1] - row0[0]
    length[0] = seq_lens[b[0]]
    i0[0] = qtile[0] * qt
    i1[0] = T.min(n_new[0], i0[0] + qt)
    # Key range of the whole tile: [k_lo, k_hi).
    k_hi[0] = length[0] - n_new[0] + i1[0]
    k_lo[0] = T.max(length[0] - n_new[0] + i0[0] - window_or_inf + 1, 0)
    nblk[0] = T.ceildiv(k_hi[0], bs) - k_lo[0] // bs
    per[0] = T.ceildiv(nblk[0], num_splits)
    blk_lo[0] = k_lo[0] // bs + split[0] * per[0]
    blk_hi[0] = T.min(T.ceildiv(k_hi[0], bs), blk_lo[0] + per[0])

def _load_queries():
    """The task's query rows, scaled, and fresh softmax states."""
    for hh, r in T.grid(hpt, rows):
        # Only the row tiles the loops below visit (a one-token row of extend: 1 of 4).
        if r // rtile * rtile < (i1[0] - i0[0]) * g:
            mrow[hh * rows + r] = T.float32(NEG)
            lrow[hh * rows + r] = T.float32(0)
            for dd in T.vectorized(d):
                acc[hh * rows + r, dd] = T.float32(0)
                qf[hh * rows + r, dd] = T.if_then_else(
                    i0[0] + r // g < i1[0],
                    T.cast(q[T.min(row0[0] + i0[0] + r // g, NT - 1), (h0[0] + hh) * g + r % g, dd], "float32") * q_scale,
                    T.float32(0),
                )
            if q_i8:
                quantize_query(hh * rows + r)
            if qk_q4:
                for dg in T.serial(d // 4):
                    q4[hh * rows + r, T.Ramp(dg * vl, 1, vl)] = repeat4(qf[hh * rows + r, T.Ramp(dg * 4, 1, 4)], vl)

def _quantize_query(row):
    """Row `row` of qf as int8 codes (qw), with their scale amax / 127 and 128 * their sum (qsc),
    for the integer-dot QK loop; without it (no qk_int8), qf itself becomes the codes' values."""
    qsc[row, 0] = T.float32(0)
    qsc[row, 1] = T.float32(0)
    for dd in T.serial(d):
        qsc[row, 0] = T.max(qsc[row, 0], T.fabs(qf[row, dd]))
    qsc[row, 2] = T.Select(qsc[row, 0] > T.float32(0), T.float32(127) / qsc[row, 0], T.float32(0))
    for dd in T.serial(d):
        qsc[row, 1] = qsc[row, 1] + T.round(qf[row, dd] * qsc[row, 2])
        qw[row, dd] = T.cast(T.round(qf[row, dd] * qsc[row, 2]), "int8")
    qsc[row, 0] = qsc[row, 0] / T.float32(127)
    qsc[row, 1] = qsc[row, 1] * T.float32(128)
    if not qk_i8:
        for dd in T.serial(d):
            qf[row, dd] = T.cast(qw[row, dd], "float32") * qsc[row, 0]

def _block_loop():
    """The task's KV blocks, head by head and row tile by row tile: scores, softmax, P·V."""
    # The task's blocks in `streams` runs visited side by side (see kv_streams):
    # block bi of each run, head by head.
    run_len[0] = T.ceildiv(blk_hi[0] - blk_lo[0], streams)
    for bi in T.serial(run_len[0]):
        for hh, rt, u in T.grid(hpt, rows // rtile, streams):
            # NOTE: `rtile` query rows at a time against one KV head's block, with
            # all scratch in this nested block: scratch that small lives on the
            # stack, where LLVM proves it aliases nothing, and fully unrolled
            # indices let it keep the score partials and the P·V tile in registers.
            # Row tiles past the task's last query token are skipped: a decode
            # step through extend has one token per sequence.
            if rt * rtile < (i1[0] - i0[0]) * g and blk_lo[0] + u * run_len[0] + bi < blk_hi[0]:
                with T.sblock("rows"):
                    T.reads()
                    T.writes()
                    s = T.sblock_alloc_buffer((rtile, bs), "float32")
                    red = T.sblock_alloc_buffer((rtile, bs), "float32")
                    part = T.sblock_alloc_buffer((rtile, vl), "float32")
                    parti = T.sblock_alloc_buffer((rtile, 16), "int32")
                    pw = T.sblock_alloc_buffer((rtile, bs if pv_i8 else 1), "uint8")  # u8 codes of P weights
                    wsc = T.sblock_alloc_buffer((rtile, 2), "float32")  # their 255 / largest, largest / 255
                    itile = T.sblock_alloc_buffer((rtile, hc * 16 if pv_i8 else 1), "int32")
                    itile2 = T.sblock_alloc_buffer((rtile, hc * 16 if pv_i8 else 1), "int32")
                    qa4 = T.sblock_alloc_buffer((rtile, 2 * vl if pv_q4 else 1), "float32")  # _pv_quads' tile
                    qb4 = T.sblock_alloc_buffer((rtile, 2 * vl if pv_q4 else 1), "float32")
                    part2 = T.sblock_alloc_buffer((rtile, vl), "float32")
                    tree = T.sblock_alloc_buffer((rtile, vl), "float32")
                    tile = T.sblock_alloc_buffer((rtile, hc * vl), "float32")
                    tile2 = T.sblock_alloc_buffer((rtile, hc * vl), "float32")
                    touch = T.sblock_alloc_buffer((1,), "float32")
                    pa = T.sblock_alloc_buffer((hk, rtile, vl), "float32")
                    pb = T.sblock_alloc_buffer((hk, rtile, vl), "float32")
                    qa = T.sblock_alloc_buffer((kh, rtile, vl), "float32")
                    qb = T.sblock_alloc_buffer((max(kq - kh, 1), rtile, vl), "float32")
                    sg = T.sblock_alloc_buffer((rtile, vl), "float32")
                    g0 = T.sblock_alloc_buffer((rtile, vl), "float32")
                    g1 = T.sblock_alloc_buffer((rtile, vl), "float32")
                    g2 = T.sblock_alloc_buffer((rtile, vl), "float32")
                    fin = T.sblock_alloc_buffer((rtile, vl), "float32")
                    sca = T.sblock_alloc_buffer((rtile, 2), "float32")
                    page = T.sblock_alloc_buffer((1,), "int32")
                    nxt = T.sblock_alloc_buffer((2,), "int32")
                    t_lo = T.sblock_alloc_buffer((1,), "int32")
                    t_hi = T.sblock_alloc_buffer((1,), "int32")
                    R = T.sblock_alloc_buffer((1,), "int32")
                    cur = T.sblock_alloc_buffer((2,), "int32")  # this block; its run's end
                    cur[0] = blk_lo[0] + u * run_len[0] + bi
                    cur[1] = T.min(blk_lo[0] + (u + 1) * run_len[0], blk_hi[0])
                    page[0] = block_tables[b[0], cur[0]]
                    t_lo[0] = T.max(k_lo[0] - cur[0] * bs, 0)
                    t_hi[0] = T.min(k_hi[0] - cur[0] * bs, bs)
                    R[0] = hh * rows + rt * rtile
                    touch[0] = T.float32(0)
                    # The rows QK reads next: the next head of this block, or the first head of the
                    # run's next block (this block again after the run's last block: harmless;
                    # with kv_streams 2 the other run's block comes between).
                    nxt[0] = T.if_then_else(hh + 1 < hpt, page[0], block_tables[b[0], T.min(cur[0] + 1, cur[1] - 1)])
                    nxt[1] = T.if_then_else(hh + 1 < hpt, h0[0] + hh + 1, h0[0])
                    for r, t in T.grid(rtile, bs):
                        s[r, t] = T.float32(NEG)
                    if qk_t:
                        qk_transposed()
                    elif qkg:
                        qk_key_group()
                    elif qk_i8:
                        qk_int8_lanes()
                    elif qk_q4:
                        qk_quads()
                    else:
                        qk_per_key()
                    if touch_v:
                        WT[task] = touch[0]
                    softmax()
                    if pv_i8:
                        pv_int8()
                    elif pv_q4:
                        pv_quads()
                    else:
                        pv()

def _qk_transposed():
    """Scores of vector_lanes keys at once (qk_transpose)."""
    # NOTE: group results pass from one unrolled `grp` iteration to a
    # later one. Touched first inside the loop, TVM's StorageRewrite
    # would share their stack slots with pa/pb (wrong scores); this
    # write before the loop keeps them live across it.
    for r in T.unroll(rtile):
        for v in T.vectorized(vl):
            g0[r, v] = T.float32(0)
            g1[r, v] = T.float32(0)
            g2[r, v] = T.float32(0)
    for ch in T.serial(bs // vl):
        if ch * vl < t_hi[0] and ch * vl + vl > t_lo[0]:
            for grp in T.unroll(ngrp):
                for k, r in T.grid(hk, rtile):
                    for v in T.vectorized(vl):
                        pa[k, r, v] = T.float32(0)
                        pb[k, r, v] = T.float32(0)
                # NOTE: rows past t_hi are read too (they are inside the block,
                # maybe NaN); each lane below sums one key only, and the mask
                # selects NEG for those keys.
                for k in T.unroll(kg):
                    key_loads(ch * vl + grp * kg + k, prefetch, ahead, locality, 0, lines)
                    for c in T.serial(nd):
                        for r in T.unroll(rtile):
                            if k < hk:
                                for v in T.vectorized(vl):
                                    pa[k, r, v] = pa[k, r, v] + qf[R[0] + r, c * vl + v] * kv_code(kv_pool, page[0], 0, h0[0] + hh, ch * vl + grp * kg + k, c * vl + v)
                            else:
                                for v in T.vectorized(vl):
                                    pb[k - hk, r, v] = pb[k - hk, r, v] + qf[R[0] + r, c * vl + v] * kv_code(kv_pool, page[0], 0, h0[0] + hh, ch * vl + grp * kg + k, c * vl + v)
                for r in T.unroll(rtile):
                    if kg == 2:
                        pa[0, r, T.Ramp(0, 1, vl)] = _merge(pa[0, r, T.Ramp(0, 1, vl)], pb[0, r, T.Ramp(0, 1, vl)], vl, 0)
                    else:
                        pa[0, r, T.Ramp(0, 1, vl)] = _merge(pa[0, r, T.Ramp(0, 1, vl)], pa[1, r, T.Ramp(0, 1, vl)], vl, 0)
                        pb[0, r, T.Ramp(0, 1, vl)] = _merge(pb[0, r, T.Ramp(0, 1, vl)], pb[1, r, T.Ramp(0, 1, vl)], vl, 0)
                        pa[0, r, T.Ramp(0, 1, vl)] = _merge(pa[0, r, T.Ramp(0, 1, vl)], pb[0, r, T.Ramp(0, 1, vl)], vl, 1)
                    # pa[0, r] now holds this group's kg keys; combine with earlier groups.
                    if nlev == 0:
                        fin[r, T.Ramp(0, 1, vl)] = pa[0, r, T.Ramp(0, 1, vl)]
                    elif grp % 2 == 0:
                        g0[r, T.Ramp(0, 1, vl)] = pa[0, r, T.Ramp(0, 1, vl)]
                    elif nlev == 1:
                        fin[r, T.Ramp(0, 1, vl)] = _merge(g0[r, T.Ramp(0, 1, vl)], pa[0, r, T.Ramp(0, 1, vl)], vl, l0)
                    elif grp // 2 % 2 == 0:
                        g1[r, T.Ramp(0, 1, vl)] = _merge(g0[r, T.Ramp(0, 1, vl)], pa[0, r, T.Ramp(0, 1, vl)], vl, l0)
                    elif nlev == 2:
                        fin[r, T.Ramp(0, 1, vl)] = _merge(g1[r, T.Ramp(0, 1, vl)], _merge(g0[r, T.Ramp(0, 1, vl)], pa[0, r, T.Ramp(0, 1, vl)], vl, l0), vl, l0 + 1)
                    elif grp // 4 % 2 == 0:
                        g2[r, T.Ramp(0, 1, vl)] = _merge(g1[r, T.Ramp(0, 1, vl)], _merge(g0[r, T.Ramp(0, 1, vl)], pa[0, r, T.Ramp(0, 1, vl)], vl, l0), vl, l0 + 1)
                    else:
                        fin[r, T.Ramp(0, 1, vl)] = _merge(g2[r, T.Ramp(0, 1, vl)], _merge(g1[r, T.Ramp(0, 1, vl)], _merge(g0[r, T.Ramp(0, 1, vl)], pa[0, r, T.Ramp(0, 1, vl)], vl, l0), vl, l0 + 1), vl, l0 + 2)
            for r in T.unroll(rtile):
                for v in T.vectorized(vl):
                    s[r, ch * vl + v] = T.if_then_else(
                        visible(cur[0] * bs + ch * vl + v, rt * rtile + r, length, n_new, i0, i1),
                        capped(row_scaled(fin[r, v], kv_scales, page[0], 0, h0[0] + hh, ch * vl + v)),
                        T.float32(NEG))

def _qk_key_group():
    """Scores of key groups x the tile's rows at once (qk_key_group)."""
    for ch in T.serial(bs // vl):
        if ch * vl < t_hi[0] and ch * vl + vl > t_lo[0]:
            for j in T.serial(rtile):
                # NOTE: a group's keys outside [t_lo, t_hi) are inside the
                # block: read (maybe NaN) and masked below.
                if (ch * rtile + j) * kq < t_hi[0] and (ch * rtile + j) * kq + kq > t_lo[0]:
                    for k in T.unroll(kq):
                        for r in T.unroll(rtile):
                            if k < kh:
                                for v in T.vectorized(vl):
                                    qa[k, r, v] = T.float32(0)
                            else:
                                for v in T.vectorized(vl):
                                    qb[k - kh, r, v] = T.float32(0)
                    for c in T.serial(nd):
                        if c % line_step == 0:
                            # The group's memory requests spread over
                            # the head dimension's steps: one line of
                            # each row per step (a burst of them all
                            # at once slowed fp32 from DRAM by 8%).
                            for k in T.unroll(kq):
                                key_loads((ch * rtile + j) * kq + k, prefetch, ahead, locality, c // line_step, 1)
                        for k in T.unroll(kq):
                            for r in T.unroll(rtile):
                                if k < kh:
                                    for v in T.vectorized(vl):
                                        qa[k, r, v] = qa[k, r, v] + qf[R[0] + r, c * vl + v] * kv_code(kv_pool, page[0], 0, h0[0] + hh, (ch * rtile + j) * kq + k, c * vl + v)
                                else:
                                    for v in T.vectorized(vl):
                                        qb[k - kh, r, v] = qb[k - kh, r, v] + qf[R[0] + r, c * vl + v] * kv_code(kv_pool, page[0], 0, h0[0] + hh, (ch * rtile + j) * kq + k, c * vl + v)
                    sg[j, T.Ramp(0, 1, vl)] = _merge_all(
                        [qa[k, r, T.Ramp(0, 1, vl)] if k < kh else qb[k - kh, r, T.Ramp(0, 1, vl)]
                         for r in range(rtile) for k in range(kq)], vl)
            for r in T.unroll(rtile):
                # Row r's vl keys from the groups' segments: whole-vector stores,
                # which the softmax's vector loads take straight from the store.
                s[r, T.Ramp(ch * vl, 1, vl)] = T.Shuffle(
                    [sg[jj, T.Ramp(0, 1, vl)] for jj in range(rtile)],
                    [jj * vl + r * kq + k for jj in range(rtile) for k in range(kq)])
                for v in T.vectorized(vl):
                    s[r, ch * vl + v] = T.if_then_else(
                        visible(cur[0] * bs + ch * vl + v, rt * rtile + r, length, n_new, i0, i1),
                        capped(row_scaled(s[r, ch * vl + v], kv_scales, page[0], 0, h0[0] + hh, ch * vl + v)),
                        T.float32(NEG))

def _qk_int8_lanes():
    """Scores of 16 keys at once, one lane per key, from an int8 pool's interleaved K (qk_int8):
    per 4 dims, one 64-byte load holds the 16 keys' codes, read as unsigned by flipping their sign
    bit (code + 128, which adds 128 * sum(q codes), subtracted per row), and each row adds their
    products with its 4 query codes (one 32-bit broadcast) in one vpdpbusd."""
    for ch in T.serial(bs // 16):
        if ch * 16 < t_hi[0] and ch * 16 + 16 > t_lo[0]:
            # NOTE: the chunk's keys outside [t_lo, t_hi) are inside the block: their codes are
            # read (any byte is a finite code), their scales (maybe NaN) only under the mask.
            for r in T.unroll(rtile):
                for v in T.vectorized(16):
                    parti[r, v] = T.int32(0)
            if pf_scales:
                if ch == 0 and rt == 0 and cur[0] + ahead < cur[1]:
                    for kv, ln in T.grid(2, spec.kv_scale_rows):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.prefetch.p0",
                            T.address_of(kv_pool[block_tables[b[0], cur[0] + ahead], kv, h0[0] + hh, bs + ln, 0]),
                            T.int32(0), T.int32(locality), T.int32(1)))
            for dg in T.serial(d // 4):
                # The 16 keys' memory requests spread over the dims' steps (a burst of them at
                # the chunk's start was slower).
                if dg % i8_step == 0:
                    for kk in T.unroll(i8_kps):
                        if dg // i8_step * i8_kps + kk < 16:
                            key_loads(ch * 16 + dg // i8_step * i8_kps + kk, prefetch, ahead, locality, 0, lines)
                for r in T.unroll(rtile):
                    parti[r, T.Ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                        "int32x16", "llvm.x86.avx512.vpdpbusd.512", parti[r, T.Ramp(0, 1, 16)],
                        T.bitwise_xor(kv_bytes[T.Ramp(slab_start(page[0], 0, h0[0] + hh) + (dg * bs + ch * 16) * 4, T.int64(1), 64)],
                                      T.Broadcast(T.int8(-128), 64)),
                        broadcast4(qw[R[0] + r, T.Ramp(dg * 4, 1, 4)]))
            for r in T.unroll(rtile):
                for v in T.vectorized(16):
                    s[r, ch * 16 + v] = T.Select(
                        visible(cur[0] * bs + ch * 16 + v, rt * rtile + r, length, n_new, i0, i1),
                        capped(row_scaled((T.cast(parti[r, v], "float32") - qsc[R[0] + r, 1]) * qsc[R[0] + r, 0],
                                          kv_scales, page[0], 0, h0[0] + hh, ch * 16 + v)),
                        T.float32(NEG))

def _qk_quads():
    """Scores of an int8 pool's interleaved K in float32 (no qk_int8): per 4 dims, one load of m4
    keys' codes (vl lanes: key-major, 4 dims each) times the row's 4 query values repeated (`q4`,
    made once per task), summed over the dims' steps; each key's 4 lanes are then summed."""
    for ch in T.serial(bs // m4):
        if ch * m4 < t_hi[0] and ch * m4 + m4 > t_lo[0]:
            for r in T.unroll(rtile):
                for v in T.vectorized(vl):
                    part[r, v] = T.float32(0)
            for dg in T.serial(d // 4):
                if dg < m4:  # head_dim >= 32: at least 8 steps for at most 4 keys
                    key_loads(ch * m4 + dg, prefetch, ahead, locality, 0, lines)
                for r in T.unroll(rtile):
                    part[r, T.Ramp(0, 1, vl)] = part[r, T.Ramp(0, 1, vl)] + q4[R[0] + r, T.Ramp(dg * vl, 1, vl)] * T.Cast(
                        f"float32x{vl}", kv_bytes[T.Ramp(slab_start(page[0], 0, h0[0] + hh) + (dg * bs + ch * m4) * 4, T.int64(1), vl)])
            for r in T.unroll(rtile):
                tree[r, T.Ramp(0, 1, vl)] = _butterfly(_butterfly(part[r, T.Ramp(0, 1, vl)], vl, 1), vl, 2)
                for j in T.unroll(m4):
                    s[r, ch * m4 + j] = T.Select(
                        visible(cur[0] * bs + ch * m4 + j, rt * rtile + r, length, n_new, i0, i1),
                        capped(row_scaled(tree[r, j * 4], kv_scales, page[0], 0, h0[0] + hh, ch * m4 + j)),
                        T.float32(NEG))

def _qk_per_key():
    """Scores key by key (the default QK loop)."""
    for t in T.serial(t_lo[0], t_hi[0]):
        key_loads(t, prefetch, ahead, locality, 0, lines)
        for r in T.unroll(rtile):
            for v in T.vectorized(vl):
                part[r, v] = T.float32(0)
            if chains == 2:
                for v in T.vectorized(vl):
                    part2[r, v] = T.float32(0)
        for c in T.serial(nd // chains):
            for r in T.unroll(rtile):
                for v in T.vectorized(vl):
                    part[r, v] = part[r, v] + qf[R[0] + r, c * chains * vl + v] * kv_code(kv_pool, page[0], 0, h0[0] + hh, t, c * chains * vl + v)
            if chains == 2:
                for r in T.unroll(rtile):
                    for v in T.vectorized(vl):
                        part2[r, v] = part2[r, v] + qf[R[0] + r, (c * 2 + 1) * vl + v] * kv_code(kv_pool, page[0], 0, h0[0] + hh, t, (c * 2 + 1) * vl + v)
        if nd % chains != 0:
            for r in T.unroll(rtile):
                for v in T.vectorized(vl):
                    part[r, v] = part[r, v] + qf[R[0] + r, (nd - 1) * vl + v] * kv_code(kv_pool, page[0], 0, h0[0] + hh, t, (nd - 1) * vl + v)
        for r in T.unroll(rtile):
            if chains == 2:
                for v in T.vectorized(vl):
                    part[r, v] = part[r, v] + part2[r, v]
            if not xrow:
                # Pairwise (tree) sum of the lanes: a short dependency chain.
                for v in T.vectorized(vl // 2):
                    tree[r, v] = part[r, v] + part[r, v + vl // 2]
                for v in T.vectorized(half[1]):
                    tree[r, v] = tree[r, v] + T.if_then_else(vl >= 8, tree[r, v + half[1]], T.float32(0))
                for v in T.vectorized(half[2]):
                    tree[r, v] = tree[r, v] + T.if_then_else(vl >= 16, tree[r, v + half[2]], T.float32(0))
                tree[r, 0] = tree[r, 0] + tree[r, 1]
        if xrow:
            # The rows' lane sums reduced together: merge levels
            # put row r in lanes [r * seg, (r + 1) * seg), then
            # xor-butterflies within those segments.
            tree[0, T.Ramp(0, 1, vl)] = _merge_rows(part, rtile, vl)
            if seg >= 8:
                tree[0, T.Ramp(0, 1, vl)] = _butterfly(tree[0, T.Ramp(0, 1, vl)], vl, 4)
            if seg >= 4:
                tree[0, T.Ramp(0, 1, vl)] = _butterfly(tree[0, T.Ramp(0, 1, vl)], vl, 2)
            if seg >= 2:
                tree[0, T.Ramp(0, 1, vl)] = _butterfly(tree[0, T.Ramp(0, 1, vl)], vl, 1)
        for r in T.unroll(rtile):
            # key position (cur[0] * bs + t) vs this row's position, causal and windowed
            if visible(cur[0] * bs + t, rt * rtile + r, length, n_new, i0, i1):
                if has_cap:
                    s[r, t] = T.tanh(row_scaled(tree[0 if xrow else r, r * seg if xrow else 0], kv_scales, page[0], 0, h0[0] + hh, t) * inv_cap) * cap_log2e
                else:
                    s[r, t] = row_scaled(tree[0 if xrow else r, r * seg if xrow else 0], kv_scales, page[0], 0, h0[0] + hh, t)

def _softmax():
    """Online softmax per row over the block's scores."""
    # Online softmax per row: new max, rescale factor, weights.
    # The block's max and sum of weights are pairwise (tree)
    # reductions in vectors; as serial scalar loops they were two
    # dependency chains of block_size steps per row (side by side:
    # fp16 Llama-3-8B decode from L2 61.1 -> 63.8 GB/s, fp32
    # 103.9 -> 106.3, a 2k prefill 5-6% faster in fp16 and fp32).
    for r in T.serial(rtile):
        for t in T.vectorized(bs):
            red[r, t] = s[r, t]
        tree_reduce(red, r, True, bs)
        sca[r, 0] = T.max(mrow[R[0] + r], red[r, 0])
        sca[r, 1] = fast_exp2(mrow[R[0] + r] - sca[r, 0])
        mrow[R[0] + r] = sca[r, 0]
        # NOTE: a masked score stays exactly NEG and gets weight 0 even
        # while the row's running max is still NEG (nothing seen yet).
        for t in T.vectorized(bs):
            s[r, t] = T.if_then_else(s[r, t] > T.float32(NEG), fast_exp2(s[r, t] - sca[r, 0]), T.float32(0))
        for t in T.vectorized(bs):
            red[r, t] = s[r, t]
        tree_reduce(red, r, False, bs)
        lrow[R[0] + r] = lrow[R[0] + r] * sca[r, 1] + red[r, 0]

def _pv():
    """P·V of the block into the rows' accumulators."""
    # P·V in register tiles of rtile rows x cgrp vectors; rows in
    # [t_lo, t_hi) hold data (never NaN), so a weight of 0 is safe.
    # NOTE: the tile is two buffers of at most 512 bytes: one larger
    # buffer (1 KiB for 4 rows x 4 vectors) became a heap workspace
    # that LLVM did not keep in registers (2.4x slower from L2).
    for cg in T.serial(nd // cgrp):
        for r in T.unroll(rtile):
            for c in T.unroll(cgrp):
                if c < hc:
                    for v in T.vectorized(vl):
                        tile[r, c * vl + v] = acc[R[0] + r, (cg * cgrp + c) * vl + v] * sca[r, 1]
                else:
                    for v in T.vectorized(vl):
                        tile2[r, (c - hc) * vl + v] = acc[R[0] + r, (cg * cgrp + c) * vl + v] * sca[r, 1]
        for t in T.serial(t_lo[0], t_hi[0]):
            if pf_head and rt == 0 and (passes * k_lines == lines or cg == 0):
                # Memory stays busy while P·V computes from cache. At 32x4096
                # and 8x16k: K rows +3-9% over none; K and V rows a further
                # +15-26% (fp32) and +11-16% (fp16).
                for kk, ln in T.grid(pf_kinds, k_lines):
                    T.evaluate(T.call_llvm_intrin(
                        "void", "llvm.prefetch.p0",
                        T.address_of(kv_pool[nxt[0], kk, nxt[1], t, (cg * k_lines + ln) % lines * per_line]),
                        T.int32(0), T.int32(head_locality), T.int32(1)))
            for c in T.unroll(cgrp):
                for r in T.unroll(rtile):
                    if c < hc:
                        for v in T.vectorized(vl):
                            tile[r, c * vl + v] = tile[r, c * vl + v] + row_scaled(s[r, t], kv_scales, page[0], 1, h0[0] + hh, t) * kv_code(kv_pool, page[0], 1, h0[0] + hh, t, (cg * cgrp + c) * vl + v)
                    else:
                        for v in T.vectorized(vl):
                            tile2[r, (c - hc) * vl + v] = tile2[r, (c - hc) * vl + v] + row_scaled(s[r, t], kv_scales, page[0], 1, h0[0] + hh, t) * kv_code(kv_pool, page[0], 1, h0[0] + hh, t, (cg * cgrp + c) * vl + v)
        for r in T.unroll(rtile):
            for c in T.unroll(cgrp):
                if c < hc:
                    for v in T.vectorized(vl):
                        acc[R[0] + r, (cg * cgrp + c) * vl + v] = tile[r, c * vl + v]
                else:
                    for v in T.vectorized(vl):
                        acc[R[0] + r, (cg * cgrp + c) * vl + v] = tile2[r, (c - hc) * vl + v]

def _scaled_weights(r):
    """Row r's block of weights times V's row scales, in place (the quantized P·V loops apply
    them per weight): a masked key keeps weight 0, and its scale (maybe NaN) is not used."""
    for t in T.vectorized(bs):
        s[r, t] = T.Select(s[r, t] > T.float32(0), s[r, t] * kv_scales[scale_index(spec, page[0], 1, h0[0] + hh, t)],
                           T.float32(0))

def _next_head_quad(tq, cg, share, npass):
    """The quantized P·V loops' requests for the next head's rows (prefetch_next_head) beside key
    quad tq of pass cg of npass: `share` lines of each row per pass (all of them in the first pass
    when they do not divide evenly)."""
    if pf_head and rt == 0 and (npass * share == lines or cg == 0):
        for tt, kk, ln in T.grid(4, pf_kinds, share):
            T.evaluate(T.call_llvm_intrin(
                "void", "llvm.prefetch.p0",
                T.address_of(kv_pool[nxt[0], kk, nxt[1], tq * 4 + tt, (cg * share + ln) % lines * per_line]),
                T.int32(0), T.int32(head_locality), T.int32(1)))

def _pv_int8():
    """P·V of the block as integer dots (pv_int8) into the rows' accumulators."""
    for r in T.serial(rtile):
        scaled_weights(r)
        for t in T.vectorized(bs):
            red[r, t] = s[r, t]
        tree_reduce(red, r, True, bs)
        wsc[r, 0] = T.Select(red[r, 0] > T.float32(0), T.float32(255) / red[r, 0], T.float32(0))
        wsc[r, 1] = red[r, 0] / T.float32(255)
        for t in T.vectorized(bs):
            pw[r, t] = T.cast(T.round(s[r, t] * wsc[r, 0]), "uint8")
    for cg in T.serial(nd // cgrp):
        for r in T.unroll(rtile):
            for v in T.vectorized(hc * 16):
                itile[r, v] = T.int32(0)
                itile2[r, v] = T.int32(0)
        for tq in T.serial(bs // 4):
            next_head_quad(tq, cg, k_lines, passes)
            for c in T.unroll(cgrp):
                for r in T.unroll(rtile):
                    if c < hc:
                        itile[r, T.Ramp(c * 16, 1, 16)] = T.call_llvm_pure_intrin(
                            "int32x16", "llvm.x86.avx512.vpdpbusd.512", itile[r, T.Ramp(c * 16, 1, 16)],
                            broadcast4(pw[r, T.Ramp(tq * 4, 1, 4)]),
                            kv_bytes[T.Ramp(slab_start(page[0], 1, h0[0] + hh) + (tq * d + (cg * cgrp + c) * 16) * 4, T.int64(1), 64)])
                    else:
                        itile2[r, T.Ramp((c - hc) * 16, 1, 16)] = T.call_llvm_pure_intrin(
                            "int32x16", "llvm.x86.avx512.vpdpbusd.512", itile2[r, T.Ramp((c - hc) * 16, 1, 16)],
                            broadcast4(pw[r, T.Ramp(tq * 4, 1, 4)]),
                            kv_bytes[T.Ramp(slab_start(page[0], 1, h0[0] + hh) + (tq * d + (cg * cgrp + c) * 16) * 4, T.int64(1), 64)])
        for r in T.unroll(rtile):
            for c in T.unroll(cgrp):
                if c < hc:
                    for v in T.vectorized(16):
                        acc[R[0] + r, (cg * cgrp + c) * 16 + v] = (acc[R[0] + r, (cg * cgrp + c) * 16 + v] * sca[r, 1]
                                                                   + T.cast(itile[r, c * 16 + v], "float32") * wsc[r, 1])
                else:
                    for v in T.vectorized(16):
                        acc[R[0] + r, (cg * cgrp + c) * 16 + v] = (acc[R[0] + r, (cg * cgrp + c) * 16 + v] * sca[r, 1]
                                                                   + T.cast(itile2[r, (c - hc) * 16 + v], "float32") * wsc[r, 1])

def _pv_quads():
    """P·V of an int8 pool's interleaved V in float32 (no pv_int8): per 4 keys, one load of vl / 4
    dims' codes (vl lanes: dim-major, 4 keys each) times the 4 keys' weights repeated, summed over
    the block's key quads; four such vectors (vl consecutive dims) are then reduced to one by two
    _merge levels into the accumulators."""
    for r in T.serial(rtile):
        scaled_weights(r)
    for cg in T.serial(nd):
        for r in T.unroll(rtile):
            for v in T.vectorized(2 * vl):
                qa4[r, v] = T.float32(0)
                qb4[r, v] = T.float32(0)
        for tq in T.serial(bs // 4):
            next_head_quad(tq, cg, k_lines_q4, nd)
            for c4 in T.unroll(4):
                for r in T.unroll(rtile):
                    if c4 < 2:
                        qa4[r, T.Ramp(c4 * vl, 1, vl)] = qa4[r, T.Ramp(c4 * vl, 1, vl)] + repeat4(s[r, T.Ramp(tq * 4, 1, 4)], vl) * T.Cast(
                            f"float32x{vl}", kv_bytes[T.Ramp(slab_start(page[0], 1, h0[0] + hh) + (tq * d + cg * vl + c4 * m4) * 4, T.int64(1), vl)])
                    else:
                        qb4[r, T.Ramp((c4 - 2) * vl, 1, vl)] = qb4[r, T.Ramp((c4 - 2) * vl, 1, vl)] + repeat4(s[r, T.Ramp(tq * 4, 1, 4)], vl) * T.Cast(
                            f"float32x{vl}", kv_bytes[T.Ramp(slab_start(page[0], 1, h0[0] + hh) + (tq * d + cg * vl + c4 * m4) * 4, T.int64(1), vl)])
        for r in T.unroll(rtile):
            acc[R[0] + r, T.Ramp(cg * vl, 1, vl)] = acc[R[0] + r, T.Ramp(cg * vl, 1, vl)] * T.Broadcast(sca[r, 1], vl) + _merge(
                _merge(qa4[r, T.Ramp(0, 1, vl)], qa4[r, T.Ramp(vl, 1, vl)], vl, q4_level),
                _merge(qb4[r, T.Ramp(0, 1, vl)], qb4[r, T.Ramp(vl, 1, vl)], vl, q4_level), vl, q4_level + 1)

def _store_rows():
    """The task's rows: normalized into `out`, or its split's partials into the workspace."""
    for hh, r in T.grid(hpt, rows):
        if i0[0] + r // g < i1[0]:
            if num_splits == 1:
                for dd in T.vectorized(d):
                    out[row0[0] + i0[0] + r // g, (h0[0] + hh) * g + r % g, dd] = T.cast(
                        acc[hh * rows + r, dd] / T.max(lrow[hh * rows + r], T.float32(1e-30)), dtype
                    )
            else:
                for dd in T.vectorized(d):
                    WO[partial_at(b[0], h0[0] + hh, r, row0[0] + i0[0] + r // g, split[0], num_splits) * d + dd] = acc[hh * rows + r, dd]
                WM[partial_at(b[0], h0[0] + hh, r, row0[0] + i0[0] + r // g, split[0], num_splits) * 2] = mrow[hh * rows + r]
                WM[partial_at(b[0], h0[0] + hh, r, row0[0] + i0[0] + r // g, split[0], num_splits) * 2 + 1] = lrow[hh * rows + r]

def _merge_splits():
    """The splits' partials of each output row merged."""
    # The splits' partials of each output row (decode: sequence x query head; extend: token row
    # x query head) merged.
    for task in T.parallel((B if decode else NT) * hq * T.min(num_splits - 1, 1)):
        with T.sblock("merge"):
            T.reads()
            T.writes()
            res = T.sblock_alloc_buffer((d,), "float32")
            tot = T.sblock_alloc_buffer((2,), "float32")
            n = task // hq  # sequence (decode) or token row (extend)
            h = task % hq // g
            r = task % g
            tot[0] = T.float32(NEG)
            tot[1] = T.float32(0)
            for s in T.serial(num_splits):
                tot[0] = T.max(tot[0], WM[partial_at(n, h, r, n, s, num_splits) * 2])
            for dd in T.vectorized(d):
                res[dd] = T.float32(0)
            for s in T.serial(num_splits):
                w = fast_exp2(WM[partial_at(n, h, r, n, s, num_splits) * 2] - tot[0])
                tot[1] = tot[1] + WM[partial_at(n, h, r, n, s, num_splits) * 2 + 1] * w
                for dd in T.vectorized(d):
                    res[dd] = res[dd] + WO[partial_at(n, h, r, n, s, num_splits) * d + dd] * w
            if n < (B if decode else q_indptr[B]):  # extend: rows past the last token have no partials
                for dd in T.vectorized(d):
                    out[q_indptr[n] if decode else n, h * g + r, dd] = T.cast(res[dd] / T.max(tot[1], T.float32(1e-30)), dtype)


# Every stage by the name the others call it by (each sees the plan's values and the other stages).
_STAGES = {
    "body": _body, "task_range": _task_range, "load_queries": _load_queries, "block_loop": _block_loop,
    "key_loads": _key_loads, "quantize_query": _quantize_query, "qk_int8_lanes": _qk_int8_lanes, "qk_quads": _qk_quads, "qk_per_key": _qk_per_key, "qk_transposed": _qk_transposed,
    "qk_key_group": _qk_key_group, "softmax": _softmax, "pv": _pv, "pv_int8": _pv_int8, "pv_quads": _pv_quads,
    "scaled_weights": _scaled_weights, "next_head_quad": _next_head_quad, "tree_reduce": _tree_reduce,
    "store_rows": _store_rows, "merge_splits": _merge_splits,
}



def lane_choices(spec: AttentionSpec, target: TargetInfo) -> tuple[int, ...]:
    """Float32 lanes per vector a template may use: those dividing head_dim, up to the host's width."""
    lanes = target.vector_bits // 32
    return tuple(v for v in (4, 8, 16) if v <= max(lanes, 4) and spec.head_dim % v == 0)


def memory_knobs(spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
    """The knobs of how a task reads the pool, shared by decode and extend (docs/performance.md
    has the measurements behind each default)."""
    vec = lane_choices(spec, target)
    heads = tuple(h for h in (1, 2, 4, 8, 16, 32) if spec.num_kv_heads % h == 0)
    # Blocks of about 128 KiB ahead, at most 4 (a task reads kv_heads_per_task heads of each block).
    task_block = 2 * heads[-1] * spec.pool_rows * spec.head_dim * elem_bytes(spec.kv_storage_dtype)
    ahead = min(4, 1 << max(0, math.ceil(math.log2(128 * 1024 / task_block))))
    return (
        Knob("vector_lanes", vec, vec[-1]),  # the widest vectors the host has
        Knob("kv_heads_per_task", heads, heads[-1]),  # all heads of a block: one contiguous run of the pool
        Knob("prefetch", (0, 1), 1),  # request a later block's rows: hardware prefetchers stop at its page
        Knob("prefetch_locality", (1, 2, 3), 2),  # where those requests go (2: L2)
        Knob("prefetch_ahead", (1, 2, 4, 8), ahead),  # how many blocks ahead
        Knob("max_splits", (1, 2, 4, 8, 16), 8),  # split-KV cap the plan applies per call
        Knob("touch_v", (0, 1), 1),  # demand loads of V rows beside the K rows, so both stream in
        Knob("prefetch_next_head", (0, 1, 2), 2),  # P·V requests the next head's K (1) or K and V (2) rows
        Knob("prefetch_head_locality", (2, 3), 3),  # where those go (3: L1, they are read next)
    )


def qk_knobs(spec: AttentionSpec, target: TargetInfo, rtile: int, row_merge: bool) -> tuple[Knob, ...]:
    """The knobs of the QK loop for row tiles of `rtile` rows; `row_merge`: whether the row-merged
    lane sums are offered."""
    # An int8 pool's interleaved K has no rows of contiguous dims: its QK loop is qk_int8 or the
    # quads loop (the key-by-key one only for blocks of fewer keys than a quads vector holds), so
    # the two loops over such rows are not offered.
    rows_of_dims = spec.kv_dtype != "int8"
    knobs = [Knob("qk_transpose", (0, 1), 0)] if rows_of_dims else []  # vector_lanes keys at once: faster from cache only
    knobs.append(Knob("qk_chains", (1, 2), 2 if rtile <= 4 else 1))  # two FMA chains per row where tiles are short
    if row_merge:
        knobs.append(Knob("qk_row_merge", (0, 1), 1))  # the tile rows' lane sums reduced together
    if rows_of_dims and rtile in (1, 2, 4, 8) and spec.block_size % lane_choices(spec, target)[-1] == 0:
        knobs.append(Knob("qk_key_group", (0, 1), 0))  # keys x rows per group: faster from cache only
    if int8_dot_supported(spec, target):
        knobs.append(Knob("qk_int8", (0, 1), 1))  # int8 KV: scores as VNNI integer dots (4x fewer operations)
        knobs.append(Knob("prefetch_scales", (0, 1), 1))  # and requests for the next blocks' scale rows
    if int8_dot_supported(spec, target, "pv"):
        knobs.append(Knob("pv_int8", (0, 1), 1))  # int8 KV: P·V as VNNI integer dots of u8 weights
    return tuple(knobs)


def int8_dot_supported(spec: AttentionSpec, target: TargetInfo, loop: str = "qk") -> bool:
    """Whether an integer-dot loop of an int8 pool can build: a host with AVX-512 VNNI, and for the
    QK loop (qk_int8) block_size a multiple of 16 (one 64-byte load holds 16 keys' codes of 4
    dims), for P·V (pv_int8) a multiple of 4 (one 32-bit lane holds 4 keys' codes of a dim)."""
    return (spec.kv_dtype == "int8" and spec.block_size % (16 if loop == "qk" else 4) == 0
            and "avx512_vnni" in target.features)


def check(spec: AttentionSpec, target: TargetInfo, config: dict[str, Any], rows: int) -> str | None:
    """Why `config` cannot build on `target` for a task of `rows` query rows per KV head, or None."""
    if config.get("qk_int8") and not int8_dot_supported(spec, target):
        return (f"qk_int8 needs kv_dtype int8 (not {spec.kv_dtype}), block_size a multiple of 16 (not "
                f"{spec.block_size}) and a host with AVX-512 VNNI")
    if config.get("pv_int8") and not int8_dot_supported(spec, target, "pv"):
        return (f"pv_int8 needs kv_dtype int8 (not {spec.kv_dtype}), block_size a multiple of 4 (not "
                f"{spec.block_size}) and a host with AVX-512 VNNI")
    if spec.head_dim % config["vector_lanes"]:
        return f"head_dim {spec.head_dim} is not a multiple of vector_lanes {config['vector_lanes']}"
    if spec.num_kv_heads % config["kv_heads_per_task"]:
        return f"kv_heads_per_task {config['kv_heads_per_task']} does not divide num_kv_heads"
    if config.get("qk_transpose") and config.get("qk_key_group"):
        return "qk_transpose and qk_key_group are two QK loops: set at most one of them"
    if config.get("qk_transpose") and spec.block_size % config["vector_lanes"]:
        return f"qk_transpose needs block_size {spec.block_size} to be a multiple of vector_lanes {config['vector_lanes']}"
    if rows * config["kv_heads_per_task"] * spec.head_dim * 4 * 2 > 512 * 1024:
        return "the per-task accumulators would not fit in L2"
    return None
