"""Measure kernels on realistic paged inputs; also the offline tuning bundle's measuring script.

`python -m pgen_runtime.measure BUNDLE --device cuda:0 -o results.json` needs only this runtime
(numpy + apache-tvm-ffi): it loads every candidate library of a bundle written by `pgen tune
--offline`, times each on the bundle's workload, and writes the results file that `pgen tune
--ingest` turns into a tuning log. A candidate that fails to load or run, or whose decode /
extend output disagrees with a float64 reference, gets no time and its error, and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import kv_quant, reference
from .kernel_table import SIGNATURES
from .kernels import PagedKernels
from .spec import AttentionSpec
from .tensors import HUGE_PAGE_BYTES, copy_from_bytes, empty, from_numpy, host_zeros, parse_device, to_numpy

BUNDLE = "bundle.json"


# CPU decode is timed on at least this much KV, far above the caches (every call reads the same
# blocks). Timed on 8 x 4096 tokens of the Llama-3-8B shape in fp16 (128 MiB), tuning chose a
# config that ran 17-34% slower than the default in bench/kernels.py, where each call reads other
# blocks.
CPU_DECODE_KV_BYTES = 512 << 20
# One-token sequences in the CPU extend tuning step (see default_workload).
CPU_EXTEND_DECODE_ROWS = 32


# GPU decode is also timed on this step, the workload's `guard`: one long sequence, where a config
# that wins the tuning batch can lose 2x (H200, Llama-3-8B fp16: 1-warp tensor-core blocks 5% faster
# than the default 4-warp ones at 32 x 4096, 59.6 against 31.8 us on one 16k-token sequence). A
# tuning log keeps a config only within pgen.tuning_log.GUARD_SLOWDOWN of the default's guard time.
GPU_DECODE_GUARD = {"seq_lens": [16384]}


def default_workload(kernel: str, device_kind: str, spec: AttentionSpec | None = None) -> dict[str, Any]:
    """A representative step: long-context decode (on a GPU with a one-sequence `guard` step);
    chunked-prefill extend (on the CPU, mixed with decode rows)."""
    if kernel == "decode":
        if device_kind != "cpu":
            return {"seq_lens": [4096] * 32, "guard": GPU_DECODE_GUARD}
        per_seq = 4096 * spec.block_bytes // spec.block_size if spec is not None else CPU_DECODE_KV_BYTES // 8
        return {"seq_lens": [4096] * min(128, max(8, -(-CPU_DECODE_KV_BYTES // per_seq)))}
    if kernel == "extend":
        if device_kind != "cpu":
            return {"seq_lens": [1024] * 8, "new_tokens": [256] * 8}
        # The engine's every CPU step goes through extend, decode steps included: time a mixed step
        # (two prefill chunks beside 32 one-token sequences), so a config that wins on prefill alone
        # but slows one-token steps (13-26% for the transposed QK loop) does not win.
        return {"seq_lens": [1024] * 2 + [4096] * CPU_EXTEND_DECODE_ROWS,
                "new_tokens": [128] * 2 + [1] * CPU_EXTEND_DECODE_ROWS}
    return {"num_tokens": 4096 if device_kind == "cpu" else 32768}


def make_checked_inputs(spec: AttentionSpec, kernel: str, workload: dict[str, Any], device: str,
                        seed: int = 0) -> tuple[tuple, np.ndarray | None]:
    """`make_inputs` and the float64 reference of the kernel's output on them (None: not attention)."""
    arrays = make_arrays(spec, kernel, workload, seed)
    return _placed(arrays, device), reference_output(spec, kernel, arrays)


def make_inputs(spec: AttentionSpec, kernel: str, workload: dict[str, Any], device: str, seed: int = 0) -> tuple:
    """Arguments for one `PagedKernels` call: random data, valid block tables in random order."""
    return _placed(make_arrays(spec, kernel, workload, seed), device)


def _placed(arrays: tuple, device: str) -> tuple:
    dev = parse_device(device)
    return tuple(_place(array, dtype, dev) for array, dtype in arrays)


def make_arrays(spec: AttentionSpec, kernel: str, workload: dict[str, Any], seed: int = 0) -> tuple:
    """`make_inputs` as host arrays: (numpy array, dtype) pairs, bfloat16 as its uint16 bits.

    A tuner places them on any device itself (a remote one through TVM's RPC).
    """
    rng = np.random.default_rng(seed)
    bs = spec.block_size
    lens = np.asarray(workload.get("seq_lens", [workload.get("num_tokens", 4096)]), np.int32)
    per_seq = -(-lens // bs)
    num_blocks = int(per_seq.sum()) + 1
    order = 1 + rng.permutation(num_blocks - 1)
    tables = np.zeros((len(lens), int(per_seq.max())), np.int32)
    start = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = order[start:start + n]
        start += n
    if spec.kv_quantized:
        values = _random(rng, (num_blocks, 2, spec.num_kv_heads, bs, spec.head_dim), "float32")[0]
        pool = (kv_quant.quantize_pool(spec, values), spec.kv_storage_dtype)
    else:
        pool = _random(rng, spec.pool_shape(num_blocks), spec.kv_dtype)
    index = lambda a: (np.ascontiguousarray(a, np.int32), "int32")  # noqa: E731
    zeros = lambda shape, dtype: (np.zeros(shape, "uint16" if dtype == "bfloat16" else dtype), dtype)  # noqa: E731
    arrays = {"kv_pool": pool, "block_tables": index(tables), "seq_lens": index(lens)}
    if kernel in ("decode", "extend"):
        new = np.asarray(workload.get("new_tokens", [1] * len(lens)), np.int32)
        arrays["q_indptr"] = index(np.concatenate([[0], np.cumsum(new)]))
        arrays["q"] = _random(rng, (int(new.sum()), spec.num_q_heads, spec.head_dim), spec.dtype)
        arrays["out"] = zeros(arrays["q"][0].shape, spec.dtype)
    elif kernel == "cache_write":
        slots = np.concatenate([tables[b, np.arange(n) // bs] * bs + np.arange(n) % bs for b, n in enumerate(lens)])
        arrays["k"] = _random(rng, (len(slots), spec.num_kv_heads, spec.head_dim), spec.dtype)
        arrays["v"] = _random(rng, (len(slots), spec.num_kv_heads, spec.head_dim), spec.dtype)
        arrays["slot_mapping"] = index(slots)
    else:
        ids = order[: max(1, (num_blocks - 1) // 2)]
        half = len(ids) // 2
        arrays["pairs"] = index(np.stack([ids[:half], ids[half:2 * half]], axis=1))
        arrays["block_ids"] = index(ids)
        arrays["host_buf"] = zeros(spec.pool_shape(len(ids)), spec.kv_storage_dtype)
    return tuple(arrays[name] for name in SIGNATURES[kernel].call)


def time_kernel(kernels: PagedKernels, kernel: str, args: tuple, warmup: int = 3, repeats: int = 10,
                min_seconds: float = 0.02) -> list[float]:
    """Milliseconds per call, `repeats` times: each the mean of enough calls to last min_seconds."""
    call = getattr(kernels, kernel)
    plan = _plan(kernels, kernel, args)
    run = (lambda: call(*args, plan=plan)) if plan is not None else (lambda: call(*args))
    return time_calls(run, _sync(kernels.device), warmup, repeats, min_seconds)


def time_guard(kernels: PagedKernels, kernel: str, guard: dict[str, Any], device: str, cache: dict) -> float:
    """Median milliseconds of a candidate on its workload's `guard` step; its output there is
    checked too. `cache` keeps the step's inputs and reference, so every candidate sees the same."""
    key = (kernel, json.dumps(guard, sort_keys=True))
    if key not in cache:
        cache[key] = make_checked_inputs(kernels.spec, kernel, guard, device)
    args, expected = cache[key]
    times = time_kernel(kernels, kernel, args)
    check_output(kernels.spec, args[-1], expected)
    return statistics.median(times)


def time_calls(run, sync=lambda: None, warmup: int = 3, repeats: int = 10, min_seconds: float = 0.02) -> list[float]:
    """Milliseconds per call of `run`, `repeats` times: each the mean of enough calls to last
    `min_seconds` (calibrated on one call after the warm-up); `sync` waits for the device."""
    for _ in range(warmup):
        run()
    sync()
    start = time.perf_counter()
    run()
    sync()
    number = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            run()
        sync()
        times.append((time.perf_counter() - start) / number * 1e3)
    return times


def measure_bundle(bundle: str | Path, device: str, progress=print) -> dict[str, Any]:
    """Time every candidate of an offline tuning bundle on this device."""
    import tvm_ffi

    from ._tvm_libs import load_tvm_runtime_libs

    root = Path(bundle)
    meta = json.loads((root / BUNDLE).read_text())
    spec = AttentionSpec.from_dict(meta["spec"])
    load_tvm_runtime_libs(root / "lib" / "tvm", cuda=device.startswith("cuda"))
    results = []
    inputs: dict[str, tuple] = {}  # one set per kernel: every candidate sees the same data
    expected: dict[str, np.ndarray | None] = {}
    guards: dict = {}  # and per guard step (time_guard)
    for i, cand in enumerate(meta["candidates"]):
        record = {k: cand.get(k) for k in ("kernel", "config", "key", "schedule")}
        try:
            module = tvm_ffi.load_module(str(root / cand["library"]))
            kernels = PagedKernels(spec, {cand["kernel"]: module[cand["kernel"]]}, device, {cand["kernel"]: cand["config"]})
            workload = meta["workloads"][cand["kernel"]]
            if cand["kernel"] not in inputs:
                inputs[cand["kernel"]], expected[cand["kernel"]] = make_checked_inputs(spec, cand["kernel"], workload, device)
            times = time_kernel(kernels, cand["kernel"], inputs[cand["kernel"]])
            check_output(spec, inputs[cand["kernel"]][-1], expected[cand["kernel"]])
            record.update(times_ms=times, median_ms=statistics.median(times), error=None, workload=workload)
            if workload.get("guard"):
                record["guard_ms"] = time_guard(kernels, cand["kernel"], workload["guard"], device, guards)
        except Exception as err:  # a broken candidate is recorded, never fatal
            record.update(times_ms=[], median_ms=None, error=f"{type(err).__name__}: {err}")
        results.append(record)
        shown = f"{record['median_ms']:.4f} ms" if record["median_ms"] is not None else record["error"][:80]
        progress(f"[{i + 1}/{len(meta['candidates'])}] {cand['kernel']} {json.dumps(cand['config'], sort_keys=True)}: {shown}")
    return {"bundle": meta["bundle_id"], "spec": meta["spec"], "target_kind": meta["target_kind"],
            "device": device_info(device), "results": results}


# Largest error relative to the output's largest magnitude a tuning candidate may have.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}


def _as_float(array: np.ndarray, dtype: str, wide: bool = True) -> np.ndarray:
    """Values of a host array as float64 (`wide`), else as the narrowest type numpy computes with:
    bfloat16 (its uint16 bits) as float32, float16 and float32 as they are."""
    if dtype == "bfloat16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float64) if wide else array


def reference_output(spec: AttentionSpec, kernel: str, arrays: tuple) -> np.ndarray | None:
    """Float64 reference of an attention kernel's output on `make_arrays` inputs (None: not attention).

    The pool stays in its own type (the reference gathers each sequence's rows into float64), so a
    512 MiB fp16 tuning pool costs no 2 GiB float64 copy.
    """
    if kernel not in ("decode", "extend"):
        return None
    values = [a if dtype == "int32" else _as_float(a, dtype, wide=i != 1) for i, (a, dtype) in enumerate(arrays)]
    if kernel == "decode":
        q, pool, tables, lens, _ = values
        return reference.decode(spec, q, pool, tables, lens)
    q, pool, tables, indptr, lens, _ = values
    return reference.extend(spec, q, pool, tables, indptr, lens)


def check_output(spec: AttentionSpec, out, want: np.ndarray | None) -> None:
    """Raise ValueError when a candidate's output `out` is not `want` within the dtype's tolerance.

    A tuning run keeps only candidates that compute the right thing: a fast wrong kernel (a knob
    combination no test covered, on a device no test ran on) must never become a tuned config.
    """
    if want is None:
        return
    got = _as_float(to_numpy(out, spec.dtype), spec.dtype)
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))
    # An int8 cache's P·V may round its weights to u8 codes (pv_int8): a looser bound.
    tol = max(TOLERANCE[spec.dtype], reference.INT8_KV_TOLERANCE if spec.kv_dtype == "int8" else 0.0)
    if not np.isfinite(err) or err > tol:
        raise ValueError(f"wrong result: max relative error {err:.3g} > {tol:g} against the float64 reference")


def device_info(device: str) -> dict[str, Any]:
    """Name and arch of `device`, for the tuning log's target id."""
    import platform

    import tvm_ffi

    dev = parse_device(device)
    if dev.dlpack_device_type() == 1:
        return {"kind": "cpu", "name": platform.processor() or platform.machine(), "machine": platform.machine()}
    attr = tvm_ffi.get_global_func("runtime.GetDeviceAttr")
    major, minor = str(attr(2, dev.index, 4)).split(".")
    return {"kind": "cuda", "name": str(attr(2, dev.index, 5)), "arch": f"sm_{major}{minor}"}


def _plan(kernels: PagedKernels, kernel: str, args: tuple):
    if kernel == "decode":
        return kernels.plan_decode(args[2], args[3], int(args[1].shape[0]))
    if kernel == "extend":
        return kernels.plan_extend(args[2], args[3], args[4], int(args[1].shape[0]))
    return None


def _sync(device: str):
    if not device.startswith("cuda"):
        return lambda: None
    import tvm_ffi

    sync = tvm_ffi.get_global_func("runtime.Device_StreamSync")
    dev = parse_device(device)
    return lambda: sync(dev, 0)


def _random(rng: np.random.Generator, shape: tuple, dtype: str) -> tuple[np.ndarray, str]:
    data = (rng.standard_normal(shape, dtype=np.float32) * 0.5)
    if dtype == "bfloat16":
        return (data.view(np.uint32) >> 16).astype(np.uint16), dtype
    return data.astype(dtype), dtype


def _place(array: np.ndarray, dtype: str, dev):
    if dev.dlpack_device_type() == 1 and dtype != "bfloat16" and array.nbytes >= HUGE_PAGE_BYTES:
        # Large host arrays (the KV pool) in memory allocated as the runtime's pools are.
        out = host_zeros(array.shape, dtype)
        out[...] = array
        return out
    if dtype == "bfloat16":
        out = empty(array.shape, dtype, dev)
        copy_from_bytes(out, array)
        return out
    return from_numpy(array, dev)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgen_runtime.measure", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="folder written by pgen tune --offline")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("-o", "--out", required=True, help="results JSON to bring back for pgen tune --ingest")
    args = parser.parse_args(argv)
    results = measure_bundle(args.bundle, args.device, progress=lambda line: print(line, flush=True))
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}: {len(results['results'])} candidates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
