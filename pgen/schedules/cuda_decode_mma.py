"""CudaDecodeMma: decode on tensor cores through mma.sync, in named stages.

For fp16/bf16 with q and KV of one dtype, head_dim a multiple of 32 up to 128 and a GQA group of
at most 16 query heads, on sm_80 and later. A thread block owns one split of one sequence's keys
for one KV head; its `mma_warps` warps take that range's 16-key tiles in turn and merge through
shared memory at the end (split-KV partials then merge in a second kernel, as in the CUDA-core
template). Per tile, a warp computes the scores of the GQA group's query rows (the 16 rows of an
m16n8k16 product; rows past the group are zero) against 16 keys with QK^T products, runs the online
softmax on the accumulator fragments in registers, and adds P·V with the probabilities as the A
operand: the score accumulators of two 8-key products are exactly the A fragment of the 16-key P·V
product, so nothing goes through shared memory between them. Compared with the CUDA-core template,
where every lane converts and multiplies its K and V elements once per query row and reduces each
score across 16 lanes by shuffles, this issues a few instructions per key for the whole group.

Fragments come straight from global memory, 16 bytes per load, with no shared-memory staging. That
works because a dot product does not depend on the order of the head dimension: the kernel gives
each lane's fragment entries the head-dim positions that make its loads contiguous, and uses the
same order for Q (for QK^T) and for the output columns (for P·V). The fragment layouts are those
the PTX ISA documents for mma.m16n8k16 (lane l: rows l/4 and l/4 + 8, column pairs 2(l % 4) and
2(l % 4) + 8).

The stages read top to bottom: `_body` (grid, buffers, the block's key range) -> `_load_queries`
-> per tile `_load_tile`, `_tile_fragments`, `_qk`, `_mask_scores`, `_softmax`, `_pv` ->
`_store_partials` -> `_merge_warps`, then the split-KV merge.
"""
# ruff: noqa: F821  # stage bodies name the buffers of the block they are expanded in

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T

from pgen_runtime.spec import AttentionSpec

from .base import Knob, ScheduleRule, TargetInfo, instantiate
from .cuda_common import MAX_SPLITS, NEG, arch_number, check_limits, score_constants, split_merge

TILE = 16  # keys per warp per iteration: two 8-key QK^T products, one 16-key P·V product


class CudaDecodeMma(ScheduleRule):
    """A block: one split of one sequence's keys for one KV head, 16 keys per warp and step."""

    kernel = "decode"
    target_kind = "cuda"

    def supports(self, spec: AttentionSpec, target: TargetInfo) -> str | None:
        if not (spec.dtype == spec.kv_dtype and spec.dtype in ("float16", "bfloat16") and spec.head_dim % 32 == 0
                and spec.head_dim <= 128 and spec.group_size <= 16):
            return (f"tensor-core decode needs q and KV in one 16-bit dtype, head_dim a multiple of 32 up to 128 "
                    f"and at most 16 query heads per KV head (dtype {spec.dtype}, kv_dtype {spec.kv_dtype}, "
                    f"head_dim {spec.head_dim}, group {spec.group_size})")
        if arch_number(target.arch) < 80:
            return f"mma.sync m16n8k16 needs sm_80 or later, not {target.arch}"
        return None

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        return (
            MAX_SPLITS,  # split-KV cap: a long sequence spreads over more blocks
            Knob("mma_warps", (1, 2, 4, 8), 4),  # warps per block taking the split's 16-key tiles in turn
            # The next tile's loads in flight during this tile's products (two tiles' fragments in
            # registers): the default at head_dim 128 only, ptxas spills with it at 96 and 32.
            Knob("mma_prefetch", (0, 1), 1 if spec.head_dim == 128 else 0),
        )

    def check(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]) -> str | None:
        return check_limits(target, config["mma_warps"] * 32, shared_bytes(spec, config))

    def apply(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]):
        if target.kind != self.target_kind or self.supports(spec, target) is not None:
            return None
        return instantiate(spec, _plan(spec, config), _STAGES)


def shared_bytes(spec: AttentionSpec, config: dict[str, Any]) -> int:
    """The warps' partial outputs and softmax states, merged at the end."""
    return config["mma_warps"] * spec.group_size * (spec.head_dim + 2) * 4


def _plan(spec: AttentionSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The template's Python-side values: warps, fragment shapes and score constants."""
    hkv, d, bs, g = spec.num_kv_heads, spec.head_dim, spec.block_size, spec.group_size
    nw = config["mma_warps"]
    step = TILE * nw  # keys the block takes per iteration
    nkc = d // 16  # k-chunks of QK^T; a lane's 16-byte load of a row covers two of them
    nkc2 = d // 32
    dl = d // 8  # P·V: 8-column products; each lane loads dl elements of a V row
    vw = 8 if dl % 8 == 0 else 4  # elements per V load (d % 32 == 0: dl is a multiple of 4)
    hi = g > 8  # rows l/4 + 8 of the fragments hold query heads
    dtype = spec.dtype
    ab = "fp16" if dtype == "float16" else "bf16"
    has_cap, q_scale, inv_cap, cap_log2e, window = score_constants(spec)
    merge = split_merge(spec, g)
    pf = bool(config["mma_prefetch"])
    return dict(locals())


def _body(q, kv_pool, block_tables, q_indptr, seq_lens, out, num_splits, max_q_tiles, B, NT):
    WO = T.alloc_buffer((B * hkv * num_splits * g * d,), "float32")
    WM = T.alloc_buffer((B * hkv * num_splits * g * 2,), "float32")
    for bx in T.thread_binding(B * hkv, thread="blockIdx.x"):
        for by in T.thread_binding(num_splits, thread="blockIdx.y"):
            for ty in T.thread_binding(nw, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("attn_mma"):
                        T.reads()
                        T.writes()
                        mo = T.sblock_alloc_buffer((nw, g, d), "float32", scope="shared")
                        mml = T.sblock_alloc_buffer((nw, g, 2), "float32", scope="shared")
                        # NOTE: staging buffers take the 16-byte loads; the fragments the mma
                        # reads are separate buffers written element by element. TVM declares
                        # a buffer that only sees vector accesses as an array of vectors, and
                        # the mma's operand offset would then count vectors, not elements.
                        qs = T.sblock_alloc_buffer((nkc2, 2, 8), dtype, scope="local")
                        qf = T.sblock_alloc_buffer((nkc * 8,), dtype, scope="local")
                        kr = T.sblock_alloc_buffer((2, nkc2, 8), dtype, scope="local")
                        kb = T.sblock_alloc_buffer((2 * nkc * 4,), dtype, scope="local")
                        vr = T.sblock_alloc_buffer((4, dl), dtype, scope="local")
                        vb = T.sblock_alloc_buffer((dl * 4,), dtype, scope="local")
                        pa = T.sblock_alloc_buffer((8,), dtype, scope="local")
                        sc = T.sblock_alloc_buffer((8,), "float32", scope="local")
                        oc = T.sblock_alloc_buffer((dl * 4,), "float32", scope="local")
                        # running max and sum of rows l/4 (0, 1) and l/4 + 8 (2, 3); new maxima (4, 5)
                        st = T.sblock_alloc_buffer((8,), "float32", scope="local")
                        b = bx // hkv
                        h = bx % hkv
                        r = tx // 4
                        j = tx % 4
                        length = seq_lens[b]
                        k_lo = T.max(length - window, 0)
                        per = T.ceildiv(T.ceildiv(T.max(length - k_lo, 0), num_splits), step) * step
                        c_lo = k_lo + by * per
                        c_hi = T.min(length, c_lo + per)
                        n_iter = T.ceildiv(T.max(c_hi - c_lo, 0), step)
                        load_queries()
                        if pf:
                            load_tile(0)
                        for it in T.serial(n_iter):
                            if not pf:
                                load_tile(it)
                            tile_fragments()
                            if pf:
                                load_tile(it + 1)
                            qk()
                            mask_scores()
                            softmax()
                            pv()
                        store_partials()
                        T.tvm_storage_sync("shared")
                        merge_warps()
    merge(WO, WM, out, q_indptr, num_splits, B)


def _load_queries():
    """Q rows r and r + 8 (query heads h * g + row) as A fragments, zero past the group, and
    fresh outputs and softmax states. Lane j's 8 elements at 32 * c2 + 8 * j serve k-chunks
    2 * c2 and 2 * c2 + 1."""
    for c2 in T.unroll(nkc2):
        for half in T.unroll(2):
            if r + 8 * half < g:
                for v in T.vectorized(8):
                    qs[c2, half, v] = q[q_indptr[b], h * g + r + 8 * half, 32 * c2 + 8 * j + v]
            else:
                for v in T.vectorized(8):
                    qs[c2, half, v] = T.cast(0, dtype)
    for kc in T.unroll(nkc):
        for e in T.unroll(8):
            # A fragment: (row r, cols 2j..) (row r+8, ..) (row r, cols 2j+8..) (row r+8, ..)
            qf[kc * 8 + e] = qs[kc // 2, e // 2 % 2, kc % 2 * 4 + e // 4 * 2 + e % 2]
    for e in T.unroll(dl * 4):
        oc[e] = T.float32(0)
    st[0] = T.float32(NEG)
    st[1] = T.float32(0)
    st[2] = T.float32(NEG)
    st[3] = T.float32(0)


def _load_tile(tl):
    """Loads of the warp's tile `tl` into kr and vr. K: lane holds key r of each 8-key product;
    V: keys 2j, 2j+1, 2j+8, 2j+9 of the 16, vw elements of every 8 vw (one load instruction of
    the warp reads whole 32-byte sectors). Keys past the range are zero (0 x a NaN of an unused
    slot would be NaN)."""
    for n2 in T.unroll(2):
        if c_lo + (tl * nw + ty) * TILE + 8 * n2 + r < c_hi:
            for c2 in T.unroll(nkc2):
                for v in T.vectorized(8):
                    kr[n2, c2, v] = kv_pool[block_tables[b, (c_lo + (tl * nw + ty) * TILE + 8 * n2 + r) // bs], 0, h,
                                            (c_lo + (tl * nw + ty) * TILE + 8 * n2 + r) % bs, 32 * c2 + 8 * j + v]
        else:
            for c2 in T.unroll(nkc2):
                for v in T.vectorized(8):
                    kr[n2, c2, v] = T.cast(0, dtype)
    for kk in T.unroll(4):
        if c_lo + (tl * nw + ty) * TILE + 2 * j + kk % 2 + 8 * (kk // 2) < c_hi:
            for p in T.unroll(dl // vw):
                for v in T.vectorized(vw):
                    vr[kk, p * vw + v] = kv_pool[block_tables[b, (c_lo + (tl * nw + ty) * TILE + 2 * j + kk % 2 + 8 * (kk // 2)) // bs], 1, h,
                                                 (c_lo + (tl * nw + ty) * TILE + 2 * j + kk % 2 + 8 * (kk // 2)) % bs, p * 8 * vw + r * vw + v]
        else:
            for p in T.unroll(dl // vw):
                for v in T.vectorized(vw):
                    vr[kk, p * vw + v] = T.cast(0, dtype)


def _tile_fragments():
    """The loaded tile as B fragments; with mma_prefetch the next tile's loads go out after
    this, into kr and vr, while this tile computes from these."""
    for n2 in T.unroll(2):
        for kc in T.unroll(nkc):
            for e in T.unroll(4):
                kb[(n2 * nkc + kc) * 4 + e] = kr[n2, kc // 2, kc % 2 * 4 + e]
    # B fragment of 8-column product t: keys (2j, 2j+1, 2j+8, 2j+9), column r, the
    # head-dim position (t // vw) * 8 vw + r * vw + t % vw.
    for t in T.unroll(dl):
        for kk in T.unroll(4):
            vb[t * 4 + kk] = vr[kk, t]


def _qk():
    """S = Q K^T: two 8-key products (keys 0-7, 8-15 of the tile)."""
    for e in T.unroll(8):
        sc[e] = T.float32(0)
    for kc in T.unroll(nkc):
        for n2 in T.unroll(2):
            T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32",
                                        qf.data, kc * 8, kb.data, (n2 * nkc + kc) * 4,
                                        sc.data, n2 * 4, False, dtype="float32"))


def _mask_scores():
    """Logits of the keys in range, NEG past it. sc[4 * n2 + e]: row r (e < 2) or r + 8, key
    8 * n2 + 2j + e % 2."""
    for n2 in T.unroll(2):
        for e in T.unroll(4):
            if c_lo + (it * nw + ty) * TILE + 8 * n2 + 2 * j + e % 2 < c_hi:
                if has_cap:
                    sc[n2 * 4 + e] = T.tanh(sc[n2 * 4 + e] * (q_scale * inv_cap)) * cap_log2e
                else:
                    sc[n2 * 4 + e] = sc[n2 * 4 + e] * q_scale
            else:
                sc[n2 * 4 + e] = T.float32(NEG)


def _softmax():
    """Online softmax per row over the 4 lanes that share it; the sums stay per lane until the end."""
    for hf in T.unroll(2 if hi else 1):
        st[4 + hf] = T.max(T.max(st[2 * hf], T.max(sc[2 * hf], sc[2 * hf + 1])),
                           T.max(sc[4 + 2 * hf], sc[5 + 2 * hf]))
        st[4 + hf] = T.max(st[4 + hf], T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), st[4 + hf], 1, 32, 32))
        st[4 + hf] = T.max(st[4 + hf], T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), st[4 + hf], 2, 32, 32))
        st[6 + hf] = T.exp2(st[2 * hf] - st[4 + hf])
        st[2 * hf] = st[4 + hf]
        st[2 * hf + 1] = st[2 * hf + 1] * st[6 + hf]
        for n2 in T.unroll(2):
            for e in T.unroll(2):
                sc[n2 * 4 + 2 * hf + e] = T.if_then_else(sc[n2 * 4 + 2 * hf + e] > T.float32(NEG),
                                                         T.exp2(sc[n2 * 4 + 2 * hf + e] - st[4 + hf]), T.float32(0))
                st[2 * hf + 1] = st[2 * hf + 1] + sc[n2 * 4 + 2 * hf + e]
        for t in T.unroll(dl):
            for e in T.unroll(2):
                oc[t * 4 + 2 * hf + e] = oc[t * 4 + 2 * hf + e] * st[6 + hf]


def _pv():
    """O += P V with P as the A fragment of the 16-key product: the two score fragments in order
    (rows r + 8 zero where no query head uses them)."""
    for e in T.unroll(8):
        pa[e] = T.cast(T.if_then_else(hi or e % 4 < 2, sc[e], T.float32(0)), dtype)
    for t in T.unroll(dl):
        T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32",
                                    pa.data, 0, vb.data, t * 4, oc.data, t * 4, False, dtype="float32"))


def _store_partials():
    """The rows' sums over their 4 lanes, and the warp's outputs and softmax states into shared
    memory. oc[4t + 2hf + e]: row r + 8 hf, column 2j + e of product t: head-dim position
    (t // vw) * 8 vw + (2j + e) * vw + t % vw."""
    for hf in T.unroll(2 if hi else 1):
        st[2 * hf + 1] = st[2 * hf + 1] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), st[2 * hf + 1], 1, 32, 32)
        st[2 * hf + 1] = st[2 * hf + 1] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), st[2 * hf + 1], 2, 32, 32)
    for hf in T.unroll(2 if hi else 1):
        if r + 8 * hf < g:
            for t in T.unroll(dl):
                for e in T.unroll(2):
                    mo[ty, r + 8 * hf, t // vw * 8 * vw + (2 * j + e) * vw + t % vw] = oc[t * 4 + 2 * hf + e]
            if j == 0:
                mml[ty, r + 8 * hf, 0] = st[2 * hf]
                mml[ty, r + 8 * hf, 1] = st[2 * hf + 1]


def _merge_warps():
    """The warps merged: thread i of the block takes elements i, i + 32 nw, ... and writes the
    output, or with splits the split's partial for the merge kernel."""
    for i in T.serial(T.ceildiv(g * d, nw * 32)):
        if i * nw * 32 + ty * 32 + tx < g * d:
            with T.sblock("warp_merge"):
                T.reads()
                T.writes()
                acc = T.sblock_alloc_buffer((3,), "float32", scope="local")
                row = (i * nw * 32 + ty * 32 + tx) // d
                col = (i * nw * 32 + ty * 32 + tx) % d
                acc[0] = T.float32(NEG)
                for w in T.unroll(nw):
                    acc[0] = T.max(acc[0], mml[w, row, 0])
                acc[1] = T.float32(0)
                acc[2] = T.float32(0)
                for w in T.unroll(nw):
                    acc[1] = acc[1] + mml[w, row, 1] * T.exp2(mml[w, row, 0] - acc[0])
                    acc[2] = acc[2] + mo[w, row, col] * T.exp2(mml[w, row, 0] - acc[0])
                if num_splits == 1:
                    out[q_indptr[b], h * g + row, col] = T.cast(acc[2] / T.max(acc[1], T.float32(1e-30)), dtype)
                else:
                    WO[(((b * hkv + h) * num_splits + by) * g + row) * d + col] = acc[2]
                    if col == 0:
                        WM[(((b * hkv + h) * num_splits + by) * g + row) * 2] = acc[0]
                        WM[(((b * hkv + h) * num_splits + by) * g + row) * 2 + 1] = acc[1]


_STAGES = {
    "body": _body, "load_queries": _load_queries, "load_tile": _load_tile, "tile_fragments": _tile_fragments,
    "qk": _qk, "mask_scores": _mask_scores, "softmax": _softmax, "pv": _pv, "store_partials": _store_partials,
    "merge_warps": _merge_warps,
}
