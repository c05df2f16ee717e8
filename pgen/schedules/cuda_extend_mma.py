"""CudaExtendMma: extend (prefill over the paged cache) on tensor cores through WMMA, in named stages.

For fp16/bf16 with q and KV of one dtype and head_dim a multiple of 16. A thread block owns
`q_tile` query tokens of one sequence times the GQA group of one KV head (16 query rows per warp)
and walks the key range in tiles of `mma_keys` keys gathered through the block table into shared
memory (the next tile's loads are in flight in registers while this one is computed). Per tile
each warp computes its 16 x mma_keys scores with m16n16k16 tensor-core products (fp32
accumulators) into shared memory, applies scale / soft-cap / causal and window masks and the online
softmax in registers (two lanes per row), and writes P in the input dtype. With `mma_o` 1 the
output stays in accumulator fragments across tiles, each lane rescaling its entries by their rows'
softmax correction (the sm_80+ fragment layout, see CUDA_PRELUDE). With `mma_o` 0 P·V goes to
shared memory a few 16-column slices at a time and is added to an fp32 output tile there, and no
accumulator entry is touched element-wise. Only the warp's own rows are touched between
__syncwarp barriers.

The stages read top to bottom: `_body` (grid, buffers, the tile's key range) -> `_load_queries`
-> `_fetch_kv` (the first tile) -> per tile `_store_kv`, `_fetch_kv` (the next one), `_qk`,
`_softmax`, `_pv_in_registers` | `_pv_in_shared` -> `_store_rows`.

NOTE: wmma pointers must be 256-bit aligned. Every shared buffer's size is a multiple of 32 bytes and
every fragment's row and column offsets are multiples of 16 elements, so the offsets TVM gives the
buffers in its one dynamic shared allocation keep that alignment.
"""
# ruff: noqa: F821  # stage bodies name the buffers of the block they are expanded in

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T

from pgen_runtime.spec import AttentionSpec

from .base import Knob, ScheduleRule, TargetInfo, instantiate
from .cuda_common import NEG, arch_number, check_limits, score_constants
# The device functions its kernels call (pgen.cuda prepends them to every CUDA build): imported so
# that this rule's schedule version (pgen.tuning_log) covers them.
from . import cuda_prelude  # noqa: F401

Q_TILES = (16, 32, 64)
VEC = 8  # 16-byte global loads of fp16/bf16
CHUNK = 16  # output-tile elements a lane updates per barrier (16 x head_dim / 32 is a multiple)


class CudaExtendMma(ScheduleRule):
    """A block: `q_tile` query tokens of one sequence times a KV head's GQA group, 16 rows per warp."""

    kernel = "extend"
    target_kind = "cuda"

    def supports(self, spec: AttentionSpec, target: TargetInfo) -> str | None:
        if not (spec.dtype == spec.kv_dtype and spec.dtype in ("float16", "bfloat16") and spec.head_dim % 16 == 0):
            return (f"tensor-core extend needs q and KV in one 16-bit dtype and head_dim a multiple of 16 "
                    f"(dtype {spec.dtype}, kv_dtype {spec.kv_dtype}, head_dim {spec.head_dim})")
        if spec.dtype == "bfloat16" and arch_number(target.arch) < 80:
            return f"bfloat16 tensor-core products need sm_80 or later, not {target.arch}"
        return None

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        return (
            Knob("q_tile", Q_TILES, 16),  # query tokens per block (q_tile x group / 16 warps) sharing each K/V tile
            Knob("mma_keys", (16, 32, 64), 32),  # keys per shared-memory tile: fewer barriers against more shared memory
            # The output in accumulator fragments (1) or in shared memory (0: head_dim 256, before sm_80).
            Knob("mma_o", (0, 1), 0),
        )

    def default(self, spec: AttentionSpec, target: TargetInfo) -> dict[str, Any]:
        """The largest tile that fits the target with at most 8 staged K/V loads per thread: at
        least 4 warps (64 query rows) where shared memory allows, since one or two warps leave each
        thread so many loads to stage that registers spill; the output in registers where allowed.

        NOTE: where no tile fits, the largest one is returned and `check` rejects it (its loads
        are at most 8 per thread up to head_dim 256, so only the target's limits rule it out); the
        registry then falls back to CudaExtendSimt.
        """
        most = next(t for t in Q_TILES if t * spec.group_size >= 64 or t == Q_TILES[-1])
        largest = None
        for tokens in sorted((t for t in Q_TILES if t <= most), reverse=True):
            for keys in (32, 16):
                config = {"rule": self.name, "q_tile": tokens, "mma_keys": keys, "mma_o": 1}
                if self.check(spec, target, config) is not None:
                    config["mma_o"] = 0
                threads = tokens * spec.group_size // 16 * 32
                staged = -(-keys * spec.head_dim // VEC // threads)  # 16-byte K and V loads per thread
                if staged <= 8 and self.check(spec, target, config) is None:
                    return config
                largest = largest or config
        return largest

    def check(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]) -> str | None:
        if config["mma_o"] and spec.head_dim > 128:
            return "mma_o 1 holds the output in registers: head_dim <= 128 (8 accumulator fragments)"
        if config["mma_o"] and arch_number(target.arch) < 80:
            return f"mma_o 1 relies on the accumulator layout of sm_80 and later, not {target.arch}"
        threads = config["q_tile"] * spec.group_size // 16 * 32
        return check_limits(target, threads, shared_bytes(spec, config), opt_in=True)

    def apply(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]):
        if target.kind != self.target_kind or self.supports(spec, target) is not None:
            return None
        return instantiate(spec, _plan(spec, config), _STAGES)


def shared_bytes(spec: AttentionSpec, config: dict[str, Any]) -> int:
    """Q, K, V and P tiles, the fp32 scores (or P·V scratch), output tile and per-row factors."""
    rows, nk, d = config["q_tile"] * spec.group_size, config["mma_keys"], spec.head_dim
    return (rows * (d + 8) * 2 + 2 * nk * (d + 8) * 2 + rows * (max(nk, d) + 4) * 4 + rows * (nk + 8) * 2
            + (0 if config["mma_o"] else rows * d * 4) + rows * 4)


def _plan(spec: AttentionSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The template's Python-side values: warps, fragment counts, shared-memory layout, loads."""
    hkv, d, bs, g = spec.num_kv_heads, spec.head_dim, spec.block_size, spec.group_size
    qt = config["q_tile"]
    nk = config["mma_keys"]
    rows = qt * g
    warps = rows // 16
    threads = warps * 32
    nfs = nk // 16  # score fragments per warp (16 keys each)
    nfd = d // 16  # 16-wide slices of head_dim
    fg = next(f for f in (8, 6, 4) if nfd % f == 0)  # P·V output fragments held at once
    o_regs = bool(config["mma_o"])  # the output stays in accumulator fragments across tiles
    nfo = nfd if o_regs else fg
    ldq, ldk, lds, ldp, ldo = d + 8, d + 8, max(nk, d) + 4, nk + 8, d
    # Offsets (elements) of the tiles in the two shared buffers: 16-bit Q, K, V, P; fp32 scores /
    # P·V scratch, output and per-row factors. Every tile is a multiple of 16 rows, so every
    # offset keeps wmma's 256-bit pointer alignment.
    # NOTE: one buffer per type, not one per tile: TVM's storage rewrite reuses a dead tile's
    # memory for a tile of the other type, which breaks tvm_access_ptr's type check.
    QO, KO = 0, rows * ldq
    VO = KO + nk * ldk
    PO = VO + nk * ldk
    H_ELEMS = PO + rows * ldp
    SO, OO = 0, rows * lds
    AO = OO + (0 if o_regs else rows * ldo)
    F_ELEMS = AO + rows
    dv = d // VEC
    q_loads = (rows * dv + threads - 1) // threads
    kv_loads = (nk * dv + threads - 1) // threads
    per_lane = 16 * d // 32  # elements of the warp's 16 x d output tile per lane
    half = nk // 2  # keys per lane in the softmax (two lanes per row)
    dtype = spec.dtype
    has_cap, q_scale, inv_cap, cap_log2e, window = score_constants(spec)
    return dict(locals())


def _body(q, kv_pool, block_tables, q_indptr, seq_lens, out, num_splits, max_q_tiles, B, NT):
    for bx in T.thread_binding(B * max_q_tiles, thread="blockIdx.x"):
        for h in T.thread_binding(hkv, thread="blockIdx.y"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("attn_mma"):
                        T.reads()
                        T.writes()
                        # Two shared buffers, one per element type, carved into tiles (see
                        # the offsets in _plan): both live through the whole kernel.
                        hb = T.sblock_alloc_buffer((H_ELEMS,), dtype, scope="shared.dyn")
                        fb = T.sblock_alloc_buffer((F_ELEMS,), "float32", scope="shared.dyn")
                        fq = T.sblock_alloc_buffer((16, 16 * nfd), dtype, scope="wmma.matrix_a")
                        fp = T.sblock_alloc_buffer((16, 16 * nfs), dtype, scope="wmma.matrix_a")
                        fk = T.sblock_alloc_buffer((16, 16), dtype, scope="wmma.matrix_b")
                        fv = T.sblock_alloc_buffer((16, 16), dtype, scope="wmma.matrix_b")
                        fs = T.sblock_alloc_buffer((16, 16 * nfs), "float32", scope="wmma.accumulator")
                        fo = T.sblock_alloc_buffer((16, 16 * nfo), "float32", scope="wmma.accumulator")
                        kr = T.sblock_alloc_buffer((kv_loads, VEC), dtype, scope="local")
                        vr = T.sblock_alloc_buffer((kv_loads, VEC), dtype, scope="local")
                        st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                        sv = T.sblock_alloc_buffer((half,), "float32", scope="local")
                        ov = T.sblock_alloc_buffer((CHUNK,), "float32", scope="local")
                        b = bx // max_q_tiles
                        i0 = bx % max_q_tiles * qt
                        row0 = q_indptr[b]
                        n_new = q_indptr[b + 1] - row0
                        length = seq_lens[b]
                        i1 = T.min(n_new, i0 + qt)
                        k_hi = length - n_new + i1
                        k_lo = T.max(length - n_new + i0 - window + 1, 0)
                        # A slot past this sequence's last tile has nothing to do.
                        n_iter = T.if_then_else(i0 < n_new, T.ceildiv(T.max(k_hi - k_lo, 0), nk), 0)
                        # This lane's softmax row (two lanes per row) and its query token.
                        r = ty * 16 + tx // 2
                        hf = tx % 2
                        tok = i0 + r // g
                        pos = length - n_new + tok
                        load_queries()
                        st[0] = T.float32(NEG)
                        st[1] = T.float32(0)
                        fetch_kv(k_lo)
                        for it in T.serial(n_iter):
                            store_kv()
                            T.tvm_storage_sync("shared")
                            fetch_kv(k_lo + (it + 1) * nk)
                            qk()
                            T.evaluate(T.call_extern("void", "__syncwarp"))
                            softmax()
                            T.evaluate(T.call_extern("void", "__syncwarp"))
                            if o_regs:
                                pv_in_registers()
                            else:
                                pv_in_shared()
                            T.tvm_storage_sync("shared")
                        store_rows()


def _load_queries():
    """The tile's Q rows (token-major, then the group's heads; zero past the new tokens) into
    shared memory and the warp's Q fragments (one per 16 columns of head_dim), which stay in
    registers; the output zeroed."""
    for j in T.serial(q_loads):
        if j * threads + ty * 32 + tx < rows * dv:
            if i0 + (j * threads + ty * 32 + tx) // dv // g < n_new:
                for v in T.vectorized(VEC):
                    hb[QO + ((j * threads + ty * 32 + tx) // dv) * ldq + (j * threads + ty * 32 + tx) % dv * VEC + v] = q[
                        row0 + i0 + (j * threads + ty * 32 + tx) // dv // g,
                        h * g + (j * threads + ty * 32 + tx) // dv % g,
                        (j * threads + ty * 32 + tx) % dv * VEC + v]
            else:
                for v in T.vectorized(VEC):
                    hb[QO + ((j * threads + ty * 32 + tx) // dv) * ldq + (j * threads + ty * 32 + tx) % dv * VEC + v] = T.cast(0, dtype)
    if o_regs:
        for f in T.unroll(nfd):
            T.evaluate(T.tvm_fill_fragment(fo.data, 16, 16, 16, f, T.float32(0), dtype="void"))
    else:
        for e in T.serial(per_lane):
            fb[OO + (ty * 16 + (e * 32 + tx) // d) * ldo + (e * 32 + tx) % d] = T.float32(0)
    T.tvm_storage_sync("shared")
    for kk in T.unroll(nfd):
        T.evaluate(T.tvm_load_matrix_sync(
            fq.data, 16, 16, 16, kk,
            T.tvm_access_ptr(T.type_annotation(dtype), hb.data, QO + ty * 16 * ldq + kk * 16, 16 * ldq, 1),
            ldq, "row_major", dtype="void"))


def _fetch_kv(start):
    """The K/V rows of the tile from key `start` into registers kr and vr: K/V tiles go global ->
    registers -> shared memory, and the next tile's loads are issued before this tile's math, so
    they are in flight while it runs. Rows past the range are zero (P is 0 there, and 0 x a NaN
    of an unused slot would be NaN)."""
    for j in T.serial(kv_loads):
        if (j * threads + ty * 32 + tx < nk * dv
                and start + (j * threads + ty * 32 + tx) // dv < k_hi):
            for v in T.vectorized(VEC):
                kr[j, v] = kv_pool[block_tables[b, (start + (j * threads + ty * 32 + tx) // dv) // bs], 0, h,
                                   (start + (j * threads + ty * 32 + tx) // dv) % bs, (j * threads + ty * 32 + tx) % dv * VEC + v]
            for v in T.vectorized(VEC):
                vr[j, v] = kv_pool[block_tables[b, (start + (j * threads + ty * 32 + tx) // dv) // bs], 1, h,
                                   (start + (j * threads + ty * 32 + tx) // dv) % bs, (j * threads + ty * 32 + tx) % dv * VEC + v]
        else:
            for v in T.vectorized(VEC):
                kr[j, v] = T.cast(0, dtype)
            for v in T.vectorized(VEC):
                vr[j, v] = T.cast(0, dtype)


def _store_kv():
    """The fetched rows into the shared K and V tiles."""
    for j in T.serial(kv_loads):
        if j * threads + ty * 32 + tx < nk * dv:
            for v in T.vectorized(VEC):
                hb[KO + (j * threads + ty * 32 + tx) // dv * ldk + (j * threads + ty * 32 + tx) % dv * VEC + v] = kr[j, v]
            for v in T.vectorized(VEC):
                hb[VO + (j * threads + ty * 32 + tx) // dv * ldk + (j * threads + ty * 32 + tx) % dv * VEC + v] = vr[j, v]


def _qk():
    """S = Q K^T for the warp's 16 rows, then to shared memory."""
    for n in T.unroll(nfs):
        T.evaluate(T.tvm_fill_fragment(fs.data, 16, 16, 16, n, T.float32(0), dtype="void"))
    for kk in T.unroll(nfd):
        for n in T.unroll(nfs):
            T.evaluate(T.tvm_load_matrix_sync(
                fk.data, 16, 16, 16, 0,
                T.tvm_access_ptr(T.type_annotation(dtype), hb.data, KO + n * 16 * ldk + kk * 16, 16 * ldk, 1),
                ldk, "col_major", dtype="void"))
            T.evaluate(T.tvm_mma_sync(fs.data, n, fq.data, kk, fk.data, 0, fs.data, n, dtype="void"))
    for n in T.unroll(nfs):
        T.evaluate(T.tvm_store_matrix_sync(
            fs.data, 16, 16, 16, n,
            T.tvm_access_ptr(T.type_annotation("float32"), fb.data, SO + ty * 16 * lds + n * 16, 16 * lds, 2),
            lds, "row_major", dtype="void"))


def _softmax():
    """Online softmax of row r over this lane's half of the tile: P in the input dtype, and the
    row's rescale factor for the output."""
    st[2] = st[0]
    for j in T.unroll(half):
        if (k_lo + it * nk + hf * half + j < k_hi and k_lo + it * nk + hf * half + j <= pos
                and k_lo + it * nk + hf * half + j > pos - window and tok < i1):
            if has_cap:
                sv[j] = T.tanh(fb[SO + (r) * lds + hf * half + j] * q_scale * inv_cap) * cap_log2e
            else:
                sv[j] = fb[SO + (r) * lds + hf * half + j] * q_scale
        else:
            sv[j] = T.float32(NEG)
        st[2] = T.max(st[2], sv[j])
    st[2] = T.max(st[2], T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), st[2], 1, 32, 32))
    st[3] = T.exp2(st[0] - st[2])
    st[1] = st[1] * st[3]
    for j in T.unroll(half):
        sv[j] = T.if_then_else(sv[j] > T.float32(NEG), T.exp2(sv[j] - st[2]), T.float32(0))
        st[1] = st[1] + sv[j]
        hb[PO + (r) * ldp + hf * half + j] = T.cast(sv[j], dtype)
    if hf == 0:
        fb[AO + r] = st[3]
    st[0] = st[2]


def _load_p():
    """The warp's P rows as A fragments."""
    for kk in T.unroll(nfs):
        T.evaluate(T.tvm_load_matrix_sync(
            fp.data, 16, 16, 16, kk,
            T.tvm_access_ptr(T.type_annotation(dtype), hb.data, PO + ty * 16 * ldp + kk * 16, 16 * ldp, 1),
            ldp, "row_major", dtype="void"))


def _pv_in_registers():
    """O = alpha O + P V with O in accumulator fragments: each lane scales its entries by their
    rows' factors (CUDA_PRELUDE)."""
    load_p()
    for f in T.unroll(nfd):
        T.evaluate(T.call_extern("void", "pgen_acc_scale_rows", fo.data, f, T.address_of(fb[AO + ty * 16])))
    for kk in T.unroll(nfs):
        for f in T.unroll(nfd):
            T.evaluate(T.tvm_load_matrix_sync(
                fv.data, 16, 16, 16, 0,
                T.tvm_access_ptr(T.type_annotation(dtype), hb.data, VO + kk * 16 * ldk + f * 16, 16 * ldk, 1),
                ldk, "row_major", dtype="void"))
            T.evaluate(T.tvm_mma_sync(fo.data, f, fp.data, kk, fv.data, 0, fo.data, f, dtype="void"))


def _pv_in_shared():
    """P V 16 columns at a time into the warp's rows of the score scratch (the scores are read
    by now), then O = alpha O + P V on the shared output tile."""
    load_p()
    for dg in T.serial(nfd // fg):
        for f in T.unroll(fg):
            T.evaluate(T.tvm_fill_fragment(fo.data, 16, 16, 16, f, T.float32(0), dtype="void"))
        for kk in T.unroll(nfs):
            for f in T.unroll(fg):
                T.evaluate(T.tvm_load_matrix_sync(
                    fv.data, 16, 16, 16, 0,
                    T.tvm_access_ptr(T.type_annotation(dtype), hb.data, VO + kk * 16 * ldk + (dg * fg + f) * 16, 16 * ldk, 1),
                    ldk, "row_major", dtype="void"))
                T.evaluate(T.tvm_mma_sync(fo.data, f, fp.data, kk, fv.data, 0, fo.data, f, dtype="void"))
        for f in T.unroll(fg):
            T.evaluate(T.tvm_store_matrix_sync(
                fo.data, 16, 16, 16, f,
                T.tvm_access_ptr(T.type_annotation("float32"), fb.data, SO + ty * 16 * lds + (dg * fg + f) * 16, 16 * lds, 2),
                lds, "row_major", dtype="void"))
    T.evaluate(T.call_extern("void", "__syncwarp"))
    # Each lane keeps to its elements of the warp's rows.
    # NOTE: read a chunk into registers, then write it: TVM's barrier insertion cannot tell
    # lanes' elements apart and puts a __syncthreads before every write that follows a read of
    # the tile.
    for c in T.serial(per_lane // CHUNK):
        for e in T.unroll(CHUNK):
            ov[e] = (fb[OO + (ty * 16 + ((c * CHUNK + e) * 32 + tx) // d) * ldo + ((c * CHUNK + e) * 32 + tx) % d]
                     * fb[AO + ty * 16 + ((c * CHUNK + e) * 32 + tx) // d]
                     + fb[SO + (ty * 16 + ((c * CHUNK + e) * 32 + tx) // d) * lds + ((c * CHUNK + e) * 32 + tx) % d])
        for e in T.unroll(CHUNK):
            fb[OO + (ty * 16 + ((c * CHUNK + e) * 32 + tx) // d) * ldo + ((c * CHUNK + e) * 32 + tx) % d] = ov[e]


def _store_rows():
    """The rows' sums over their two lanes, then the output normalized by them."""
    st[1] = st[1] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), st[1], 1, 32, 32)
    if hf == 0:
        fb[AO + r] = st[1]
    if o_regs:
        for f in T.unroll(nfd):
            T.evaluate(T.tvm_store_matrix_sync(
                fo.data, 16, 16, 16, f,
                T.tvm_access_ptr(T.type_annotation("float32"), fb.data, SO + ty * 16 * lds + f * 16, 16 * lds, 2),
                lds, "row_major", dtype="void"))
    T.tvm_storage_sync("shared")
    for e in T.serial(per_lane):
        if n_iter > 0 and i0 + (ty * 16 + (e * 32 + tx) // d) // g < i1:
            if o_regs:
                out[row0 + i0 + (ty * 16 + (e * 32 + tx) // d) // g, h * g + (ty * 16 + (e * 32 + tx) // d) % g, (e * 32 + tx) % d] = T.cast(
                    fb[SO + (ty * 16 + (e * 32 + tx) // d) * lds + (e * 32 + tx) % d] / T.max(fb[AO + ty * 16 + (e * 32 + tx) // d], T.float32(1e-30)), dtype)
            else:
                out[row0 + i0 + (ty * 16 + (e * 32 + tx) // d) // g, h * g + (ty * 16 + (e * 32 + tx) // d) % g, (e * 32 + tx) % d] = T.cast(
                    fb[OO + (ty * 16 + (e * 32 + tx) // d) * ldo + (e * 32 + tx) % d] / T.max(fb[AO + ty * 16 + (e * 32 + tx) // d], T.float32(1e-30)), dtype)


_STAGES = {
    "body": _body, "load_queries": _load_queries, "fetch_kv": _fetch_kv, "store_kv": _store_kv, "qk": _qk,
    "softmax": _softmax, "load_p": _load_p, "pv_in_registers": _pv_in_registers, "pv_in_shared": _pv_in_shared,
    "store_rows": _store_rows,
}
