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
from pgen_runtime.spec import load_spec

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
    bs = spec.block_size
    lens = [1, max(bs - 1, 1), bs + 1, 2048, 300]
    case = reference.paged_case(spec, lens, new_tokens=[1, 1, bs + 1, 128, 64])
    want = reference.expected(spec, case)
    rows = []
    for name, run in _runs(kernels, case).items():
        got, ms = run()
        if name in ("decode", "extend"):
            # beyond what an int8 cache's u8 P·V weights may add (reference.weight_rounding_allowance)
            off = np.maximum(np.abs(got.astype(np.float64) - want[name]) - want[f"{name}_allowance"], 0.0)
            err = float(off.max() / np.abs(want[name]).max())
            ok = err <= TOLERANCE[spec.dtype]
        else:  # data movement must be bit exact, NaN payloads included
            err = float(np.count_nonzero(got.view(np.uint8) != want[name].view(np.uint8)))
            ok = err == 0
        rows.append(ok)
        progress(f"  {name:<12} {'ok  ' if ok else 'FAIL'}  {'max rel err' if name in ('decode', 'extend') else 'bytes differing'} "
                 f"{err:.2e}  {ms:8.3f} ms")
    progress(f"\n{sum(rows)} passed, {len(rows) - sum(rows)} failed")
    return all(rows)


def _runs(kernels, case: dict) -> dict[str, Callable[[], tuple[np.ndarray, float]]]:
    """One closure per kernel: run it on a copy of the case's arrays, return (result, best ms)."""
    pool, tables, lens = case["pool"], case["block_tables"], case["seq_lens"]

    def attention(kind):
        q = case[f"q_{kind}"]
        out = np.full_like(q, np.nan)
        args = (q, pool, tables, lens, out) if kind == "decode" else (q, pool, tables, case["q_indptr"], lens, out)
        return out, min(time_kernel(kernels, kind, args, repeats=3))

    def moved(call):
        work = pool.copy()
        start = time.perf_counter()
        result = call(work)
        return (work if result is None else result), (time.perf_counter() - start) * 1e3

    def swap_out(work):
        buf = np.empty((len(case["swap_ids"]),) + pool.shape[1:], pool.dtype)
        kernels.swap_out(work, case["swap_ids"], buf)
        return buf

    def swap_in(work):
        buf = pool[case["swap_ids"]]
        work[case["swap_ids"]] = 0
        kernels.swap_in(buf, case["swap_ids"], work)

    return {
        "decode": lambda: attention("decode"),
        "extend": lambda: attention("extend"),
        "cache_write": lambda: moved(lambda w: kernels.cache_write(case["k"], case["v"], w, case["slot_mapping"])),
        "copy_blocks": lambda: moved(lambda w: kernels.copy_blocks(w, case["pairs"])),
        "swap_out": lambda: moved(swap_out),
        "swap_in": lambda: moved(swap_in),
    }
