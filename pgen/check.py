"""`pgen check`: build a spec's CPU kernels and verify each against the float64 reference.

The quick start's main job: it shows the whole path (spec -> TIR -> schedule -> LLVM -> loaded
library -> paged inputs) working on this machine, with progress, errors and timings in one table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from pgen_runtime.measure import time_kernel
from pgen_runtime.spec import AttentionSpec, load_spec

from . import reference
from .build import build_kernels, build_library

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "specs" / "llama3-8b.toml"
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def check_spec(spec_path: str | Path | None = None, progress: Callable[[str], None] = print) -> bool:
    """Build `spec_path` (default: Llama-3-8B) for llvm and check all six kernels; True if all pass."""
    spec = load_spec(spec_path or DEFAULT_SPEC)
    progress(f"spec {spec.name or spec.uri}: {spec.uri}")
    progress("building decode, extend, cache_write, copy_blocks, swap_out, swap_in for llvm (cached after the first run) ...")
    start = time.perf_counter()
    lib = build_library(spec, "llvm")
    progress(lib.summary())
    kernels = build_kernels(spec, "llvm")
    progress(f"built and loaded in {time.perf_counter() - start:.1f}s\n")
    rng = np.random.default_rng(0)
    bs = spec.block_size
    lens = [1, bs - 1 if bs > 1 else 1, bs + 1, 2048, 300]
    pool, tables = _paged_cache(spec, lens, rng)
    rows = []
    for name, run in _cases(spec, kernels, pool, tables, lens, rng).items():
        err, ms = run()
        ok = err <= (TOLERANCE[spec.dtype] if name in ("decode", "extend") else 0.0)
        rows.append((name, ok, err, ms))
        progress(f"  {name:<12} {'ok  ' if ok else 'FAIL'}  max rel err {err:.2e}  {ms:8.3f} ms")
    passed = sum(r[1] for r in rows)
    progress(f"\n{passed} passed, {len(rows) - passed} failed")
    return passed == len(rows)


def _paged_cache(spec: AttentionSpec, lens: list[int], rng) -> tuple[np.ndarray, np.ndarray]:
    """A pool with NaN in every unused slot and random block placement."""
    bs = spec.block_size
    per = [-(-n // bs) for n in lens]
    pool = np.full((sum(per) + 4, 2, spec.num_kv_heads, bs, spec.head_dim), np.nan, spec.kv_dtype)
    order = 1 + rng.permutation(pool.shape[0] - 1)
    tables = np.zeros((len(lens), max(per)), np.int32)
    at = 0
    for b, n in enumerate(lens):
        tables[b, : per[b]] = order[at : at + per[b]]
        at += per[b]
        pos = np.arange(n)
        pool[tables[b, pos // bs], :, :, pos % bs] = rng.standard_normal((n, 2, spec.num_kv_heads, spec.head_dim))
    return pool, tables


def _cases(spec, kernels, pool, tables, lens, rng) -> dict[str, Callable[[], tuple[float, float]]]:
    seq = np.asarray(lens, np.int32)
    hq, hkv, d, dt = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.dtype

    def rel(got, want):
        return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))

    def decode():
        q = rng.standard_normal((len(lens), hq, d)).astype(dt)
        out = np.full_like(q, np.nan)
        ms = min(time_kernel(kernels, "decode", (q, pool, tables, seq, out), repeats=3))
        return rel(out, reference.decode(spec, q, pool, tables, seq)), ms

    def extend():
        new = np.minimum(seq, [1, 5, 17, 128, 64]).astype(np.int32)
        indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
        q = rng.standard_normal((int(indptr[-1]), hq, d)).astype(dt)
        out = np.full_like(q, np.nan)
        ms = min(time_kernel(kernels, "extend", (q, pool, tables, indptr, seq, out), repeats=3))
        return rel(out, reference.extend(spec, q, pool, tables, indptr, seq)), ms

    def cache_write():
        k = rng.standard_normal((8, hkv, d)).astype(dt)
        v = rng.standard_normal((8, hkv, d)).astype(dt)
        slots = (tables[3, 1] * spec.block_size + np.arange(8) % spec.block_size).astype(np.int32)
        slots[np.arange(8) >= spec.block_size] = -1
        slots[2] = -1
        want = reference.cache_write(k, v, pool, slots)
        work = pool.copy()
        start = time.perf_counter()
        kernels.cache_write(k, v, work, slots)
        return _diff(work, want), (time.perf_counter() - start) * 1e3

    def copy_blocks():
        pairs = np.stack([tables[3, :4], tables[3, 4:8]], axis=1).astype(np.int32)
        want = reference.copy_blocks(pool, pairs)
        work = pool.copy()
        start = time.perf_counter()
        kernels.copy_blocks(work, pairs)
        return _diff(work, want), (time.perf_counter() - start) * 1e3

    def swap():
        ids = tables[3, :16].copy()
        buf = np.empty((len(ids),) + pool.shape[1:], pool.dtype)
        work = pool.copy()
        start = time.perf_counter()
        kernels.swap_out(work, ids, buf)
        work[ids] = 0
        kernels.swap_in(buf, ids, work)
        return _diff(work, pool), (time.perf_counter() - start) * 1e3

    return {"decode": decode, "extend": extend, "cache_write": cache_write, "copy_blocks": copy_blocks,
            "swap_out+in": swap}


def _diff(got: np.ndarray, want: np.ndarray) -> float:
    """Bytes that differ (NaN payloads included): copies must be bit exact."""
    return float(np.count_nonzero(got.view(np.uint8) != want.view(np.uint8)))
