"""CPU kernel benchmark: pgen's paged decode/extend against the baselines, side by side in one run.

Llama-3-8B attention shape (32 q heads, 8 KV heads, head_dim 128), block size 16. For each dtype,
batch and context it times, on the same inputs:
  - pgen paged decode (random block placement in a pool far larger than the 480 MiB L3; each timed
    call reads a different set of blocks, so the KV comes from DRAM as in serving),
  - pgen decode on a contiguous layout (block table = consecutive blocks),
  - pgen extend on the same one-token rows, as the engine's CPU decode steps run (`ext ms`),
  - TVM's own CPU decode kernel (`tvm.relax.frontend.nn.llm._decode_kernels._attention_decode_cpu`),
  - torch SDPA on a contiguous cache (one copy per block-table set, taken in turn, so its working
    set is as far above the caches as ours), and torch gather (index_select through the block
    table) + SDPA,
  - a TVM kernel that only reads (sums) the same paged blocks in decode's order and task split,
    without prefetches: what a plain paged read reaches (`rd GB/s`; not a hard ceiling, decode's
    prefetches may read faster),
  - pgen paged decode with every table entry pointing at one of 4 blocks, which then stay in L2:
    decode's arithmetic rate with no memory traffic (`L2 GB/s`, in KV bytes the call would read).
    Decode cannot beat the lesser of that and the read bandwidth (`roof`); with GQA it is the
    lesser for fp16, whose 2-byte elements cost as many FMAs as fp32's 4-byte ones,
and measures this machine's read and copy bandwidth (torch, all threads) again for every decode
row, interleaved with that row's timings: %read and %copy compare against bandwidth measured at the
same moment (it moves by a third within minutes on this shared machine). Extend is timed as a
2k-token prefill against the fp32 matmul rate, and on an engine-like mixed step against its parts.
Prints a table and writes JSON (default bench/results/kernels.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
from pathlib import Path

import numpy as np

import pgen
from pgen_runtime import kv_quant
from pgen_runtime.measure import time_calls
from pgen_runtime.tensors import host_zeros, huge_page_share

L3_BYTES = 480 << 20
SPEC = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)


def best_ms(fn, repeats: int = 7, min_s: float = 0.05) -> float:
    """Median milliseconds per call of `fn` (pgen_runtime.measure.time_calls, one warm-up)."""
    return float(np.median(time_calls(fn, warmup=1, repeats=repeats, min_seconds=min_s)))


class Bandwidth:
    """This machine's memory bandwidth now: torch copy and sum over 1 GiB per side (far beyond L3).

    NOTE: the machine is shared and its bandwidth moves by a third within minutes, so every decode
    row measures it again, interleaved with its own timings, and quotes its percentages against that.
    The buffers sit on huge pages where Linux offers them, as the KV pools do (`on_huge_pages`).
    """

    def __init__(self, torch) -> None:
        self.n = 1 << 28
        self.x = on_huge_pages(torch, torch.ones(self.n, dtype=torch.float32))
        self.y = on_huge_pages(torch, torch.zeros(self.n, dtype=torch.float32))

    def read_gbps(self) -> float:
        return self.n * 4 / best_ms(lambda: self.x.sum(), repeats=3) / 1e6

    def copy_gbps(self) -> float:
        """Bytes read plus bytes written, per second."""
        return 2 * self.n * 4 / best_ms(lambda: self.y.copy_(self.x), repeats=3) / 1e6


def on_huge_pages(torch, t):
    """A copy of CPU tensor `t` in memory allocated like the runtime's KV pools (huge pages where
    Linux offers them: see pgen_runtime.tensors.host_zeros), so baselines read memory as ours do."""
    out = torch.from_numpy(host_zeros(tuple(t.shape), str(t.dtype).removeprefix("torch.")))
    out.copy_(t)
    return out


def machine_rates(torch, bw: Bandwidth) -> dict:
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    mm = best_ms(lambda: torch.mm(a, b), repeats=5)
    return {"copy_gbps_rw": bw.copy_gbps(), "read_gbps": bw.read_gbps(), "matmul_gflops": 2 * 2048**3 / mm / 1e6}


def fill_pool(spec, pool, row: np.ndarray) -> None:
    """Every K/V row of `pool` set to `row` [head_dim] (cheap for pools of GiBs), as codes and
    scales where the pool is quantized."""
    if not spec.kv_quantized:
        pool[...] = row.astype(spec.kv_dtype)
        return
    codes, scale = kv_quant.quantize_rows(spec, row)
    slab = np.broadcast_to(codes, (spec.block_size, spec.head_dim))
    kv_quant.set_pool_codes(spec, pool, np.stack([slab, slab]))
    raw = np.zeros(spec.kv_scale_rows * spec.head_dim, np.uint8)
    raw[: 4 * spec.block_size] = np.full(spec.block_size, scale, np.float32).view(np.uint8)
    pool[:, :, :, spec.block_size:] = raw.view(pool.dtype).reshape(spec.kv_scale_rows, spec.head_dim)


class Case:
    """One decode configuration: a pool much larger than L3, and `sets` disjoint block tables."""

    def __init__(self, spec, batch: int, ctx: int, rng, max_pool_bytes: int) -> None:
        self.spec, self.batch, self.ctx = spec, batch, ctx
        per_seq = ctx // spec.block_size
        kv_bytes = batch * ctx * spec.block_bytes // spec.block_size
        self.sets = max(1, min(int(3 * L3_BYTES // kv_bytes), max_pool_bytes // kv_bytes))
        nb = self.sets * batch * per_seq + 1
        # The pool as the runtime allocates it (PagedKernels.new_pool: 2 MiB huge pages where Linux
        # offers them); `huge_pct` records how much of it got them.
        self.pool = host_zeros(spec.pool_shape(nb), spec.kv_storage_dtype)
        fill_pool(spec, self.pool, rng.standard_normal(spec.head_dim, dtype=np.float32))
        self.huge_pct = 100 * (huge_page_share(self.pool) or 0.0)
        self.tables = (1 + rng.permutation(nb - 1)).reshape(self.sets, batch, per_seq).astype(np.int32)
        self.contig = (1 + np.arange(nb - 1)).reshape(self.sets, batch, per_seq).astype(np.int32)
        self.lens = np.full(batch, ctx, np.int32)
        self.q = rng.standard_normal((batch, spec.num_q_heads, spec.head_dim)).astype(spec.dtype)
        self.out = np.empty_like(self.q)
        self.kv_bytes = kv_bytes
        self.i = 0

    def next_tables(self, contiguous: bool) -> np.ndarray:
        self.i = (self.i + 1) % self.sets
        return (self.contig if contiguous else self.tables)[self.i]


def bench_decode(kernels, tvm_decode, read_kernel, torch, case: Case, bw: Bandwidth, rounds: int = 3) -> dict:
    s = case.spec
    plan = kernels.plan_decode(case.tables[0], case.lens)
    row = {"dtype": s.dtype, "batch": case.batch, "ctx": case.ctx, "kv_mb": case.kv_bytes / 2**20,
           "num_splits": plan.num_splits, "pool_huge_page_pct": case.huge_pct}
    # Rounds of (read, copy, paged, contiguous) side by side; each quantity keeps its median.
    times: dict[str, list[float]] = {"read_gbps": [], "copy_gbps_rw": [], "paged_read_ms": [], "paged_ms": [],
                                     "contig_ms": [], "l2_ms": [], "extend_rows_ms": []}
    indptr = np.arange(case.batch + 1, dtype=np.int32)
    eplan = kernels.plan_extend(case.tables[0], indptr, case.lens)
    row["extend_num_splits"] = eplan.num_splits
    per = -(-case.tables.shape[2] // plan.num_splits)  # the read kernel's runs: decode's splits
    l2_table = (1 + np.arange(case.tables[0].size) % 4).reshape(case.tables[0].shape).astype(np.int32)
    for _ in range(rounds):
        times["read_gbps"].append(bw.read_gbps())
        times["copy_gbps_rw"].append(bw.copy_gbps())
        times["paged_read_ms"].append(best_ms(lambda: read_kernel(case.pool, case.next_tables(False), per), repeats=5))
        times["paged_ms"].append(best_ms(lambda: kernels.decode(case.q, case.pool, case.next_tables(False),
                                                                case.lens, case.out, plan=plan), repeats=5))
        times["contig_ms"].append(best_ms(lambda: kernels.decode(case.q, case.pool, case.next_tables(True),
                                                                 case.lens, case.out, plan=plan), repeats=5))
        times["l2_ms"].append(best_ms(lambda: kernels.decode(case.q, case.pool, l2_table, case.lens, case.out, plan=plan),
                                      repeats=5))
        times["extend_rows_ms"].append(best_ms(lambda: kernels.extend(case.q, case.pool, case.next_tables(False), indptr,
                                                                      case.lens, case.out, plan=eplan), repeats=5))
    row.update({k: float(np.median(v)) for k, v in times.items()})
    if tvm_decode is not None:
        row["tvm_ms"] = tvm_decode(case)
    tq = torch.from_numpy(case.q.astype(np.float32) if s.dtype == "float16" else case.q)[:, :, None, :]
    tpool = torch.from_numpy(case.pool)
    dt = torch.float16 if s.dtype == "float16" else torch.float32
    tq = tq.to(dt)

    def gather(tables):
        blocks = tpool.index_select(0, torch.from_numpy(tables.reshape(-1).astype(np.int64)))
        kv = blocks.view(case.batch, -1, 2, s.num_kv_heads, s.block_size, s.head_dim)
        k = kv[:, :, 0].permute(0, 2, 1, 3, 4).reshape(case.batch, s.num_kv_heads, case.ctx, s.head_dim)
        v = kv[:, :, 1].permute(0, 2, 1, 3, 4).reshape(case.batch, s.num_kv_heads, case.ctx, s.head_dim)
        return k, v

    # One contiguous K/V copy per block-table set, taken in turn: SDPA's working set is as far
    # above the cache as the paged timings' (one reused copy would stay in L3 at small sizes).
    copies = [tuple(on_huge_pages(torch, t) for t in gather(case.tables[i])) for i in range(case.sets)]
    turn = itertools.cycle(copies)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row["sdpa_contig_ms"] = best_ms(lambda: sdpa(tq, *next(turn), enable_gqa=True))
    copies = turn = None  # free the contiguous copies before the gather timing
    row["gather_sdpa_ms"] = best_ms(lambda: sdpa(tq, *gather(case.next_tables(False)), enable_gqa=True), repeats=3)
    row["paged_gbps"] = case.kv_bytes / row["paged_ms"] / 1e6
    row["paged_read_gbps"] = case.kv_bytes / row["paged_read_ms"] / 1e6
    row["l2_gbps"] = case.kv_bytes / row["l2_ms"] / 1e6
    row["roof_gbps"] = min(row["read_gbps"], row["l2_gbps"])
    return row


def paged_read_kernel(spec):
    """A TVM kernel that only reads the cache, in decode's order: each task sums every K/V row of a
    run of one sequence's blocks, all KV heads of a block together (K then V of each head), as
    decode's default `kv_heads_per_task` does; runs of `per` blocks (split-KV) give short batches
    tasks for every thread. No prefetches and no arithmetic beyond 16-lane adds: what the hardware
    reads through the block table on its own. A 16-bit cache is read as int32 pairs with integer
    adds (converting every element would make this kernel compute-bound). Returns a function
    (pool, tables, per)."""
    import tvm
    from tvm.script import tirx as T

    from pgen.target import host_cpu_name

    H, BS, D, dt = spec.num_kv_heads, spec.block_size, spec.head_dim, spec.kv_dtype
    if dt != "float32":
        D, dt = D // 2, "int32"
    assert D % 64 == 0, "the read kernel takes 64 elements of a row per step"

    @T.prim_func(s_tir=True)
    def read_all(pool_h: T.handle, bt_h: T.handle, out_h: T.handle, per: T.int32):
        T.func_attr({"tirx.noalias": True})
        NB, B, MB, NT = T.int32(), T.int32(), T.int32(), T.int32()
        pool = T.match_buffer(pool_h, (NB, 2, H, BS, D), dt, align=2)
        bt = T.match_buffer(bt_h, (B, MB), "int32", align=4)
        out = T.match_buffer(out_h, (NT, 16), dt, align=4)
        for task in T.parallel(NT):
            with T.sblock("task"):
                acc = T.sblock_alloc_buffer((4, 16), dt)  # 4 independent add chains
                for u in T.unroll(4):
                    for v in T.vectorized(16):
                        acc[u, v] = T.cast(0, dt)
                for i, h, c, t, dd in T.grid(per, H, 2, BS, D // 64):
                    if task % T.ceildiv(MB, per) * per + i < MB:
                        for u in T.unroll(4):
                            for v in T.vectorized(16):
                                acc[u, v] = acc[u, v] + pool[bt[task // T.ceildiv(MB, per), task % T.ceildiv(MB, per) * per + i], c, h, t, (dd * 4 + u) * 16 + v]
                for v in T.vectorized(16):
                    out[task, v] = acc[0, v] + acc[1, v] + acc[2, v] + acc[3, v]

    lib = tvm.compile(tvm.IRModule({"main": read_all}), target=tvm.target.Target({"kind": "llvm", "mcpu": host_cpu_name()}))
    fn = lib["main"]

    sums: dict[int, np.ndarray] = {}  # per task count: allocated once, outside the timed calls

    def run(pool, tables, per: int) -> None:
        b, mb = tables.shape
        tasks = b * -(-mb // per)
        if tasks not in sums:
            sums[tasks] = np.empty((tasks, 16), np.float32 if dt == "float32" else np.int32)
        fn(pool if dt == "float32" else pool.view(np.int32), tables, sums[tasks], per)

    return run


def tvm_builtin_decode(spec):
    """TVM's own paged CPU decode (MLC's), built for this CPU; returns a timer over a Case."""
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    from pgen.target import host_cpu_name

    func = _attention_decode_cpu(spec.num_kv_heads, spec.num_q_heads, spec.head_dim, spec.dtype, False, {},
                                 spec.block_size)
    lib = tvm.compile(tvm.IRModule({"decode": func.with_attr("global_symbol", "decode")}),
                      target=tvm.target.Target({"kind": "llvm", "mcpu": host_cpu_name()}))
    fn = lib["decode"]

    def run(case: Case) -> float:
        # NOTE: TVM's kernel assumes 64-byte aligned buffers (aligned vector loads); numpy only
        # guarantees 16, so every argument is in aligned memory (the pool is allocated so).
        b = case.batch
        per = case.tables.shape[2]
        indptr = _aligned(np.arange(b + 1, dtype=np.int32) * per)
        last = _aligned(np.full(b, spec.block_size, np.int32))
        zeros = _aligned(np.zeros(b, np.int32))
        lse = _aligned(np.empty((b, spec.num_q_heads), np.float32))
        q, out = _aligned(case.q), _aligned(case.out)
        args = lambda: (q, case.pool, indptr, _aligned(case.next_tables(False).reshape(-1)), last, zeros, zeros,  # noqa: E731
                        out, lse, 0, 1.0, 1e4, spec.scale)
        return best_ms(lambda: fn(*args()), repeats=3, min_s=0.02)

    return run


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized array whose data starts on a 64-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def _aligned(a: np.ndarray) -> np.ndarray:
    """A copy of `a` whose data starts on a 64-byte boundary."""
    out = _aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def bench_extend(kernels, torch, spec, n: int, rates: dict, rng) -> dict:
    bs = spec.block_size
    nb = n // bs + 1
    pool = rng.standard_normal((nb, 2, spec.num_kv_heads, bs, spec.head_dim)).astype(spec.kv_dtype)
    tables = (1 + rng.permutation(nb - 1)).reshape(1, -1).astype(np.int32)
    q = rng.standard_normal((n, spec.num_q_heads, spec.head_dim)).astype(spec.dtype)
    out = np.empty_like(q)
    indptr = np.array([0, n], np.int32)
    lens = np.array([n], np.int32)
    plan = kernels.plan_extend(tables, indptr, lens)
    ms = best_ms(lambda: kernels.extend(q, pool, tables, indptr, lens, out, plan=plan), repeats=3, min_s=0.0)
    flops = 4 * spec.num_q_heads * spec.head_dim * n * (n + 1) / 2
    dt = torch.float16 if spec.dtype == "float16" else torch.float32
    tq = torch.from_numpy(q.astype(np.float32)).to(dt).transpose(0, 1)[None]
    tk = torch.randn(1, spec.num_kv_heads, n, spec.head_dim).to(dt)
    sdpa = best_ms(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tk, is_causal=True, enable_gqa=True),
                   repeats=3, min_s=0.0)
    return {"dtype": spec.dtype, "new_tokens": n, "ms": ms, "gflops": flops / ms / 1e6,
            "pct_matmul": 100 * flops / ms / 1e6 / rates["matmul_gflops"], "sdpa_ms": sdpa}


def bench_mixed_step(kernels, spec) -> dict:
    """An engine-like CPU step through extend: 2 prefill chunks of 128 tokens at 1k beside 32
    one-token sequences at 4k, against its two parts run apart (equal when the work is spread
    evenly over the threads)."""
    from pgen_runtime.measure import make_inputs

    parts = {"mixed": ([1024] * 2 + [4096] * 32, [128] * 2 + [1] * 32),
             "prefill": ([1024] * 2, [128] * 2), "rows": ([4096] * 32, [1] * 32)}
    args = {n: make_inputs(spec, "extend", {"seq_lens": lens, "new_tokens": new}, "cpu")
            for n, (lens, new) in parts.items()}
    times = {n: [] for n in parts}
    for _ in range(3):
        for n, a in args.items():
            times[n].append(best_ms(lambda: kernels.extend(*a), repeats=3))
    ms = {n: float(np.median(v)) for n, v in times.items()}
    return {"dtype": spec.dtype, "mixed_ms": ms["mixed"], "prefill_ms": ms["prefill"], "rows_ms": ms["rows"],
            "mixed_over_parts": ms["mixed"] / (ms["prefill"] + ms["rows"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="512,4096,16384")
    parser.add_argument("--max-pool-gib", type=float, default=2.5)
    parser.add_argument("--no-tvm", action="store_true", help="skip TVM's built-in decode (slow)")
    args = parser.parse_args()
    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    bw = Bandwidth(torch)
    rates = machine_rates(torch, bw)
    print(f"threads {threads}; copy {rates['copy_gbps_rw']:.1f} GB/s (read+write), read {rates['read_gbps']:.1f} GB/s, "
          f"fp32 matmul {rates['matmul_gflops']:.0f} GFLOP/s", flush=True)
    head = (f"{'dtype':<8}{'B':>4}{'ctx':>7}{'KV MB':>8}{'paged ms':>10}{'contig':>8}{'p/c':>6}{'GB/s':>7}{'%read':>7}"
            f"{'%copy':>7}{'rd GB/s':>8}{'%rd':>5}{'L2 GB/s':>8}{'%roof':>6}"
            f"{'sdpa':>8}{'x sdpa':>7}{'gath+sdpa':>10}{'tvm ms':>9}{'x tvm':>7}{'ext ms':>8}{'e/d':>6}")
    print(head, flush=True)
    rows, extend_rows, mixed_rows = [], [], []
    for dtype in args.dtypes.split(","):
        spec = pgen.AttentionSpec(**SPEC, dtype=dtype)
        kernels = pgen.build_kernels(spec)
        tvm_decode = None if args.no_tvm else tvm_builtin_decode(spec)
        read_kernel = paged_read_kernel(spec)
        for batch in map(int, args.batches.split(",")):
            for ctx in map(int, args.contexts.split(",")):
                kv = batch * ctx * spec.block_bytes // spec.block_size
                if kv > args.max_pool_gib * 2**30:
                    continue
                case = Case(spec, batch, ctx, rng, int(args.max_pool_gib * 2**30))
                row = bench_decode(kernels, tvm_decode if kv <= 256 << 20 else None, read_kernel, torch, case, bw)
                row["pct_read_bw"] = 100 * row["paged_gbps"] / row["read_gbps"]
                row["pct_copy_bw"] = 100 * row["paged_gbps"] / row["copy_gbps_rw"]
                rows.append(row)
                tvm = row.get("tvm_ms")
                print(f"{dtype:<8}{batch:>4}{ctx:>7}{row['kv_mb']:>8.0f}{row['paged_ms']:>10.3f}{row['contig_ms']:>8.3f}"
                      f"{row['paged_ms'] / row['contig_ms']:>6.2f}{row['paged_gbps']:>7.1f}{row['pct_read_bw']:>6.0f}%"
                      f"{row['pct_copy_bw']:>6.0f}%{row['paged_read_gbps']:>8.1f}"
                      f"{100 * row['paged_gbps'] / row['paged_read_gbps']:>4.0f}%"
                      f"{row['l2_gbps']:>8.1f}{100 * row['paged_gbps'] / row['roof_gbps']:>5.0f}%"
                      f"{row['sdpa_contig_ms']:>8.3f}{row['sdpa_contig_ms'] / row['paged_ms']:>7.2f}"
                      f"{row['gather_sdpa_ms']:>10.3f}{(tvm or float('nan')):>9.2f}"
                      f"{(tvm or float('nan')) / row['paged_ms']:>7.1f}{row['extend_rows_ms']:>8.3f}"
                      f"{row['extend_rows_ms'] / row['paged_ms']:>6.2f}", flush=True)
                del case
        extend_rows.append(bench_extend(kernels, torch, spec, 2048, rates, rng))
        e = extend_rows[-1]
        print(f"extend {dtype} 2048 new tokens: {e['ms']:.1f} ms, {e['gflops']:.1f} GFLOP/s = {e['pct_matmul']:.0f}% "
              f"of fp32 matmul; torch SDPA {e['sdpa_ms']:.1f} ms", flush=True)
        mixed_rows.append(bench_mixed_step(kernels, spec))
        m = mixed_rows[-1]
        print(f"extend {dtype} mixed step (2 x 128 new at 1k + 32 x 1 at 4k): {m['mixed_ms']:.1f} ms; its parts apart "
              f"{m['prefill_ms']:.1f} + {m['rows_ms']:.1f} ms ({m['mixed_over_parts']:.2f}x their sum)", flush=True)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": threads, **rates},
              "decode": rows, "extend": extend_rows, "extend_mixed_step": mixed_rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
