"""GPU probe, device half: decode time against the split-KV factor, and (where Nsight Compute is
installed and allowed) one profiled decode launch. Needs .gpu/ from bench/gpu/prepare.py.

Prints a table and writes probe.json (and ncu_decode.txt) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import pgen_runtime

DEV = "cuda:0"


def cuda_time(fn, reps: int = 20) -> float:
    """Milliseconds per call: the median of `reps` events after a warm-up."""
    for _ in range(3):
        fn()
    if not DEV.startswith("cuda"):  # a dry run of this script on the build host
        import time
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def case(kernels, batch: int, ctx: int):
    s = kernels.spec
    bs = s.block_size
    nb = batch * ctx // bs + 1
    dt = torch.float16 if s.kv_dtype == "float16" else torch.bfloat16
    pool = torch.randn((nb, 2, s.num_kv_heads, bs, s.head_dim), device=DEV).to(dt)
    tables_np = (1 + np.random.permutation(nb - 1)).reshape(batch, -1).astype(np.int32)
    lens_np = np.full(batch, ctx, np.int32)
    q = torch.randn((batch, s.num_q_heads, s.head_dim), device=DEV).to(dt)
    return pool, tables_np, lens_np, q, nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-dir", default=".gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--package", default="llama3-8b-float16.pgenpkg")
    parser.add_argument("--device", default="cuda:0", help="cpu: a dry run on the llvm target")
    parser.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEV
    DEV = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kernels = pgen_runtime.load_package(Path(args.gpu_dir) / "packages" / args.package, DEV)
    max_splits = kernels.configs["decode"].get("max_splits", 1)
    if args.profile_child:  # one planned decode at 32 x 16k, for ncu
        pool, tables_np, lens_np, q, nb = case(kernels, 32, 16384)
        tables, lens, o = torch.from_numpy(tables_np).to(DEV), torch.from_numpy(lens_np).to(DEV), torch.empty_like(q)
        plan = kernels.plan_decode(tables_np, lens_np, nb)
        for _ in range(3):
            kernels.decode(q, pool, tables, lens, o, plan=plan)
        if DEV.startswith("cuda"):
            torch.cuda.synchronize()
        return 0
    rows = []
    print(f"decode {kernels.spec.uri}, config {kernels.configs['decode']}: time (us) against num_splits", flush=True)
    shapes = ((1, 16384), (8, 4096), (8, 16384), (32, 4096), (32, 16384), (64, 4096))
    for batch, ctx in shapes if DEV.startswith("cuda") else ((2, 512),):
        pool, tables_np, lens_np, q, nb = case(kernels, batch, ctx)
        tables, lens, o = torch.from_numpy(tables_np).to(DEV), torch.from_numpy(lens_np).to(DEV), torch.empty_like(q)
        base = kernels.plan_decode(tables_np, lens_np, nb)
        kv_bytes = pool[1:].numel() * pool.element_size()
        times = {}
        for splits in sorted({1, 2, 4, 8, 16, 32, 64, base.num_splits} & set(range(1, max_splits + 1))):
            plan = dataclasses.replace(base, num_splits=splits)
            times[splits] = cuda_time(lambda: kernels.decode(q, pool, tables, lens, o, plan=plan)) * 1e3
        best = min(times, key=times.get)
        rows.append({"batch": batch, "ctx": ctx, "planned": base.num_splits, "times_us": times, "best": best,
                     "planned_gbps": kv_bytes / times[base.num_splits] / 1e3, "best_gbps": kv_bytes / times[best] / 1e3})
        print(f"  {batch:>3} x {ctx:>5}: planned {base.num_splits:>2} {times[base.num_splits]:8.1f} us "
              f"({rows[-1]['planned_gbps']:.0f} GB/s); best {best:>2} {times[best]:8.1f} us ({rows[-1]['best_gbps']:.0f} GB/s)  "
              + " ".join(f"{k}:{v:.0f}" for k, v in times.items()), flush=True)
        pool = q = o = None  # free the GPU memory before the next shape
        if DEV.startswith("cuda"):
            torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(0) if DEV.startswith("cuda") else DEV, "package": args.package, "splits": rows}
    ncu = None
    if DEV.startswith("cuda"):
        ncu = shutil.which("ncu") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/ncu")), None)
    report["ncu"] = ncu
    if ncu:
        # The attention kernel is `decode_kernel`; `decode_kernel_1` is the split-KV merge.
        cmd = [ncu, "--kernel-name", "decode_kernel", "--launch-skip", "1", "--launch-count", "1",
               "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis", "--section", "WarpStateStats",
               "--section", "Occupancy", "--section", "LaunchStats",
               sys.executable, __file__, "--gpu-dir", args.gpu_dir, "--out", args.out, "--package", args.package,
               "--profile-child"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=os.environ)
        text = res.stdout + res.stderr
        (out / "ncu_decode.txt").write_text(text)
        print(text[-6000:], flush=True)
    else:
        print("ncu: not installed", flush=True)
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
