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

import torch

import check  # bench/gpu/check.py beside this script: its decode case and timer
import pgen_runtime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-dir", default=".gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--package", default="llama3-8b-float16.pgenpkg")
    parser.add_argument("--device", default="cuda:0", help="cpu: a dry run on the llvm target")
    parser.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check.DEV = args.device
    gpu = args.device.startswith("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kernels = pgen_runtime.load_package(Path(args.gpu_dir) / "packages" / args.package, args.device)
    max_splits = kernels.configs["decode"].get("max_splits", 1)
    if args.profile_child:  # one planned decode at 32 x 16k, for ncu
        pool, tables, lens, q, o, plan = check.decode_case(kernels, 32, 16384)
        for _ in range(3):
            kernels.decode(q, pool, tables, lens, o, plan=plan)
        check.sync()
        return 0
    rows = []
    print(f"decode {kernels.spec.uri}, config {kernels.configs['decode']}: time (us) against num_splits", flush=True)
    shapes = ((1, 16384), (8, 4096), (8, 16384), (32, 4096), (32, 16384), (64, 4096))
    for batch, ctx in shapes if gpu else ((2, 512),):
        pool, tables, lens, q, o, base = check.decode_case(kernels, batch, ctx)
        kv_bytes = pool[1:].numel() * pool.element_size()
        times = {}
        for splits in sorted({1, 2, 4, 8, 16, 32, 64, base.num_splits} & set(range(1, max_splits + 1))):
            plan = dataclasses.replace(base, num_splits=splits)
            times[splits] = check.cuda_time(lambda: kernels.decode(q, pool, tables, lens, o, plan=plan)) * 1e3
        best = min(times, key=times.get)
        rows.append({"batch": batch, "ctx": ctx, "planned": base.num_splits, "times_us": times, "best": best,
                     "planned_gbps": kv_bytes / times[base.num_splits] / 1e3, "best_gbps": kv_bytes / times[best] / 1e3})
        print(f"  {batch:>3} x {ctx:>5}: planned {base.num_splits:>2} {times[base.num_splits]:8.1f} us "
              f"({rows[-1]['planned_gbps']:.0f} GB/s); best {best:>2} {times[best]:8.1f} us ({rows[-1]['best_gbps']:.0f} GB/s)  "
              + " ".join(f"{k}:{v:.0f}" for k, v in times.items()), flush=True)
        pool = q = o = None  # free the GPU memory before the next shape
        if gpu:
            torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(0) if gpu else args.device, "package": args.package, "splits": rows}
    ncu = None
    if gpu:
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
