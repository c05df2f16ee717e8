"""One dense layer of a compiled model per weight dtype: GFLOP/s of float32, bfloat16 and int8 side by side.

The layer is `silu(x @ W) * c` with W a constant [K, N] (a gate projection with its SiLU epilogue),
compiled through `compile-model`'s pipeline (`relax_import.model_pipeline`) for this CPU, once per
weight dtype the host can build (bf16 pairs need AVX-512 BF16 for `vdpbf16ps`, int8 needs VNNI).
The dtypes run interleaved, `--rounds` times, each round `--calls` calls; the table gives the
median round per dtype, and the int8 row includes its activation quantizer (one per call).

    python bench/dense.py [--k 896] [--n 4864] [--tokens 1,32,256] [--rounds 5] [--calls 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from pgen.onnx.relax_import import model_pipeline
from pgen.schedules import cpu_dense
from pgen.target import parse_targets

RESULTS = Path(__file__).parent / "results" / "dense.json"


def build(k: int, n: int, w: np.ndarray, c: np.ndarray, weight_dtype: str, target):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("num_tokens", "int64"), k], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(relax.op.multiply(relax.op.multiply(y, relax.op.sigmoid(y)), relax.const(c)))
        bb.emit_func_output(out)
    tvm_target = tvm.target.Target(target.tvm_target())
    with tvm_target:
        lowered = model_pipeline(target, weight_dtype)(bb.get())
    return relax.VirtualMachine(tvm.compile(lowered, target=tvm_target), tvm.cpu())["main"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=896)
    ap.add_argument("--n", type=int, default=4864)
    ap.add_argument("--tokens", default="1,32,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    (target,) = parse_targets("llvm")
    dtypes = ["float32", "bfloat16"] + (["int8"] if cpu_dense.has_vnni(target.info) else [])
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.k, args.n)) / np.sqrt(args.k)).astype(np.float32)
    c = rng.standard_normal(args.n).astype(np.float32)
    layers = {d: build(args.k, args.n, w, c, d, target) for d in dtypes}
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = tvm.runtime.tensor(rng.standard_normal((tokens, args.k)).astype(np.float32))
        ref = x.numpy().astype(np.float64) @ w
        ref = ref / (1 + np.exp(-ref)) * c
        times = {d: [] for d in dtypes}
        errors = {}
        for d, f in layers.items():
            out = f(x).numpy()
            errors[d] = float(np.abs(out - ref).max() / np.abs(ref).max())
        for _ in range(args.rounds):
            for d, f in layers.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    f(x)
                times[d].append((time.perf_counter() - start) / args.calls)
        flops = 2 * tokens * args.k * args.n
        row = {"tokens": tokens, "k": args.k, "n": args.n}
        for d in dtypes:
            seconds = statistics.median(times[d])
            row[d] = {"ms": seconds * 1e3, "gflop_s": flops / seconds / 1e9, "max_rel_err": errors[d]}
        rows.append(row)
    head = ["tokens", *(f"{d} GFLOP/s (ms)" for d in dtypes), *(f"{d} / float32" for d in dtypes[1:]),
            *(f"{d} max rel err" for d in dtypes)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for r in rows:
        cells = [str(r["tokens"]), *(f"{r[d]['gflop_s']:.0f} ({r[d]['ms']:.3f})" for d in dtypes),
                 *(f"{r['float32']['ms'] / r[d]['ms']:.2f}x" for d in dtypes[1:]),
                 *(f"{r[d]['max_rel_err']:.1e}" for d in dtypes)]
        print("| " + " | ".join(cells) + " |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                   "mcpu": target.mcpu, "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
