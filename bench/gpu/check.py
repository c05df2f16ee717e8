"""The GPU check, device half: load pgen packages with only pgen_runtime + tvm_ffi, verify every kernel,
time decode against torch SDPA and the measured copy bandwidth, run the CUDA model packages against
onnxruntime's tokens and a torch decoder (`model_check.py`), and measure offline tuning bundles.

Runs on an H100/H200 machine whose Python has torch but no apache-tvm. `bench/gpu/prepare.py` builds
what it needs into .gpu/ on the build host; `bench/gpu/run.sh` is the one command to run there.
Prints tables and writes gpu_check.json (and one tuning results file per bundle) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

import pgen_runtime
from pgen_runtime.measure import TOLERANCE, measure_bundle, time_calls

DEV = "cuda:0"
# Packages whose kernels are timed against torch SDPA, side by side: decode and extend by default
# (fp16 and bf16), the CUDA-core decode (CudaDecodeSimt, "mma0"), and the tensor-core decode
# (CudaDecodeMma) with 1 warp per block and without mma_prefetch.
TIMED = {"llama3-8b-float16.pgenpkg": ("decode", "extend"), "llama3-8b-bfloat16.pgenpkg": ("decode", "extend"),
         "llama3-8b-float16-decode-mma0.pgenpkg": ("decode",), "llama3-8b-float16-decode-mma_warps1.pgenpkg": ("decode",),
         "llama3-8b-float16-decode-mma_prefetch0.pgenpkg": ("decode",),
         "llama3-8b-float16-decode-mma_warps1-mma_prefetch0.pgenpkg": ("decode",)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-dir", default=".gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-tuning", action="store_true")
    parser.add_argument("--skip-models", action="store_true", help="skip the CUDA model packages (models/)")
    parser.add_argument("--device", default="cuda:0", help="cpu runs the correctness checks on the llvm target")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    gpu = DEV.startswith("cuda")
    out = Path(args.out)
    root = Path(args.gpu_dir)
    report = {"device": torch.cuda.get_device_name(0) if gpu else DEV, "torch": torch.__version__, "checks": [],
              "decode": [], "extend": [], "errors": []}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        print(f"device: {report['device']} sm_{props.major}{props.minor}, {props.multi_processor_count} SMs", flush=True)
        report["copy_gbps"] = copy_bandwidth()
        print(f"device copy bandwidth (read+write): {report['copy_gbps']:.0f} GB/s", flush=True)
    for pkg in sorted((root / "packages").glob("*.pgenpkg")):
        try:
            kernels = pgen_runtime.load_package(pkg, DEV)
        except Exception as err:  # noqa: BLE001  # report and go on with the other packages
            report["errors"].append(f"{pkg.name}: load failed: {err}")
            print(report["errors"][-1], flush=True)
            continue
        print(f"\n== {pkg.name}: {kernels.spec.uri}", flush=True)
        for name, fn in CHECKS.items():
            try:
                err = fn(kernels)
                ok = err <= TOLERANCE[kernels.spec.dtype] if name in ("decode", "extend") else err == 0
                report["checks"].append({"package": pkg.name, "kernel": name, "error": err, "ok": bool(ok)})
                print(f"  {name:<12} {'ok  ' if ok else 'FAIL'} max rel err {err:.2e}", flush=True)
            except Exception as exc:  # noqa: BLE001
                report["checks"].append({"package": pkg.name, "kernel": name, "error": None, "ok": False,
                                         "exception": traceback.format_exc(limit=3)})
                print(f"  {name:<12} FAIL {type(exc).__name__}: {exc}", flush=True)
        if gpu and "decode" in TIMED.get(pkg.name, ()):
            report["decode"] += time_decode(kernels, report["copy_gbps"], pkg.name)
        if gpu and "extend" in TIMED.get(pkg.name, ()):
            report["extend"] += time_extend(kernels, pkg.name)
    if gpu and (root / "models").is_dir() and not args.skip_models:
        from model_check import check_models  # bench/gpu/, beside this script

        try:
            report["model"] = check_models(root / "models", DEV)
            report["checks"] += [{"kernel": f"model {c['mode']}", **c} for c in report["model"]["checks"]]
        except Exception as err:  # noqa: BLE001  # report and go on with the tuning
            report["errors"].append(f"model section: {err}")
            print(traceback.format_exc(), flush=True)
    if gpu and not args.skip_tuning:
        for bundle in sorted((root / "bundles").glob("*")):
            print(f"\n== tuning bundle {bundle.name}", flush=True)
            try:
                results = measure_bundle(bundle, DEV, progress=lambda line: print("  " + line, flush=True))
                (out / f"tune_{bundle.name}.json").write_text(json.dumps(results, indent=1))
            except Exception as err:  # noqa: BLE001
                report["errors"].append(f"bundle {bundle.name}: {err}")
                print(traceback.format_exc(), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    failed = [c for c in report["checks"] if not c["ok"]]
    print(f"\n{len(report['checks']) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed or report["errors"] else 0


# ---- correctness ----------------------------------------------------------------------------

def make_cache(spec, lens, seed):
    """Pool with NaN in every unused slot, random block placement, tables padded with block 0."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    bs = spec.block_size
    per = [-(-n // bs) for n in lens]
    nb = sum(per) + 3
    order = (1 + torch.randperm(nb - 1, generator=g)).tolist()
    tables = torch.zeros((len(lens), max(per)), dtype=torch.int32)
    pool = torch.full((nb, 2, spec.num_kv_heads, bs, spec.head_dim), float("nan"), dtype=_dt(spec.kv_dtype))
    at = 0
    for b, n in enumerate(lens):
        tables[b, : per[b]] = torch.tensor(order[at : at + per[b]])
        at += per[b]
        for i in range(0, n, bs):
            m = min(bs, n - i)
            pool[tables[b, i // bs], :, :, :m] = torch.randn((2, spec.num_kv_heads, m, spec.head_dim), generator=g).to(pool.dtype)
    return pool.to(DEV), tables.to(DEV), tables.numpy()


def reference(spec, q, pool, tables, indptr, lens):
    out = torch.empty(q.shape, dtype=torch.float32, device=DEV)
    bs, g = spec.block_size, spec.group_size
    for b, n in enumerate(lens):
        lo, hi = int(indptr[b]), int(indptr[b + 1])
        pos = torch.arange(n, device=DEV)
        blocks = tables[b, pos // bs].long()
        k = pool[blocks, 0, :, pos % bs].float().repeat_interleave(g, dim=1)  # [n, Hq, D]
        v = pool[blocks, 1, :, pos % bs].float().repeat_interleave(g, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k) * spec.scale
        if spec.logit_softcap:
            logits = spec.logit_softcap * torch.tanh(logits / spec.logit_softcap)
        qpos = torch.arange(n - (hi - lo), n, device=DEV)[:, None]
        mask = pos[None, :] <= qpos
        if spec.sliding_window:
            mask &= pos[None, :] > qpos - spec.sliding_window
        logits = logits.masked_fill(~mask[None], float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), v)
    return out


def _past_window(spec):
    """A length beyond the sliding window, so the window's lower bound is exercised."""
    return [spec.sliding_window + 300] if spec.sliding_window else []


def rel_err(got, want):
    return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))


def check_decode(kernels):
    """Split-KV (a 2100-token sequence beside short ones) and, all sequences short, one split."""
    s = kernels.spec
    worst = 0.0
    for seed, lens in ((1, [1, s.block_size - 1, s.block_size + 1, 2100, 700, 33] + _past_window(s)), (3, [1, 17, 200])):
        pool, tables, _ = make_cache(s, lens, seed)
        q = torch.randn((len(lens), s.num_q_heads, s.head_dim), device=DEV).to(_dt(s.dtype))
        out = torch.full_like(q, float("nan"))
        seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
        kernels.decode(q, pool, tables, seq, out)
        sync()
        worst = max(worst, rel_err(out, reference(s, q, pool, tables, list(range(len(lens) + 1)), lens)))
    return worst


def check_extend(kernels):
    s = kernels.spec
    lens, new = [5, 40, 300, 2100] + _past_window(s), [5, 3, 129, 64] + [70] * len(_past_window(s))
    pool, tables, _ = make_cache(s, lens, 2)
    indptr = [0] + np.cumsum(new).tolist()
    q = torch.randn((indptr[-1], s.num_q_heads, s.head_dim), device=DEV).to(_dt(s.dtype))
    out = torch.full_like(q, float("nan"))
    kernels.extend(q, pool, tables, torch.tensor(indptr, dtype=torch.int32, device=DEV),
                   torch.tensor(lens, dtype=torch.int32, device=DEV), out)
    sync()
    return rel_err(out, reference(s, q, pool, tables, indptr, lens))


def check_cache_write(kernels):
    s = kernels.spec
    pool, _, _ = make_cache(s, [64], 3)
    pool = torch.nan_to_num(pool)
    n = 37
    k = torch.randn((n, s.num_kv_heads, s.head_dim), device=DEV).to(_dt(s.dtype))
    v = torch.randn_like(k)
    slots = torch.randperm(pool.shape[0] * s.block_size, device=DEV)[:n].int()
    slots[3] = -1
    want = pool.clone()
    for t in range(n):
        sl = int(slots[t])
        if sl >= 0:
            want[sl // s.block_size, 0, :, sl % s.block_size] = k[t]
            want[sl // s.block_size, 1, :, sl % s.block_size] = v[t]
    kernels.cache_write(k, v, pool, slots)
    sync()
    return float((pool.float() - want.float()).abs().max())


def check_copy_blocks(kernels):
    s = kernels.spec
    pool, _, _ = make_cache(s, [256], 4)
    pool = torch.nan_to_num(pool)
    pairs = torch.tensor([[1, 9], [2, 10], [5, 12]], dtype=torch.int32, device=DEV)
    want = pool.clone()
    for a, b in pairs.tolist():
        want[b] = want[a]
    kernels.copy_blocks(pool, pairs)
    sync()
    return float((pool.float() - want.float()).abs().max())


def check_swap(kernels):
    s = kernels.spec
    pool, _, _ = make_cache(s, [256], 5)
    pool = torch.nan_to_num(pool)
    ids = torch.tensor([3, 7, 1, 12], dtype=torch.int32, device=DEV)
    buf = torch.empty((4,) + tuple(pool.shape[1:]), dtype=pool.dtype, device=DEV)
    kernels.swap_out(pool, ids, buf)
    host = buf.cpu()  # the bytes go to host memory and come back
    before = pool.clone()
    pool[ids.long()] = 0
    kernels.swap_in(host.to(DEV), ids, pool)
    sync()
    return float((pool.view(torch.int16) != before.view(torch.int16)).sum())


CHECKS = {"decode": check_decode, "extend": check_extend, "cache_write": check_cache_write,
          "copy_blocks": check_copy_blocks, "swap_out+in": check_swap}


# ---- timing ---------------------------------------------------------------------------------

def copy_bandwidth(nbytes=4 << 30):
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=DEV)
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x), reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def cuda_time(fn, reps=20, warmup=3):
    """Milliseconds per call of `fn`: CUDA events on the GPU, wall time on the CPU (dry runs)."""
    if not DEV.startswith("cuda"):
        return float(np.median(time_calls(fn, warmup=warmup, repeats=5, min_seconds=0.0)))
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return float(np.median(times))


def decode_case(kernels, batch: int, ctx: int):
    """A decode step of `batch` sequences of `ctx` tokens: random pool, blocks in random order."""
    s = kernels.spec
    bs = s.block_size
    nb = batch * ctx // bs + 1
    pool = torch.randn((nb, 2, s.num_kv_heads, bs, s.head_dim), device=DEV).to(_dt(s.kv_dtype))
    tables_np = (1 + np.random.permutation(nb - 1)).reshape(batch, -1).astype(np.int32)
    lens_np = np.full(batch, ctx, np.int32)
    q = torch.randn((batch, s.num_q_heads, s.head_dim), device=DEV).to(_dt(s.dtype))
    plan = kernels.plan_decode(tables_np, lens_np, nb)
    return (pool, torch.from_numpy(tables_np).to(DEV), torch.from_numpy(lens_np).to(DEV), q,
            torch.empty_like(q), plan)


def time_decode(kernels, copy_gbps, package):
    s = kernels.spec
    rows = []
    print(f"\n  decode {s.uri} {json.dumps(kernels.configs['decode'], sort_keys=True)}: ours vs torch SDPA "
          "(contiguous cache)", flush=True)
    print(f"  {'batch':>5} {'ctx':>6} {'ours us':>9} {'sdpa us':>9} {'speedup':>8} {'KV GB/s':>8} {'% copy':>7}", flush=True)
    for batch in (1, 8, 32, 64):
        for ctx in (1024, 4096, 16384):
            if batch * ctx > 64 * 8192:
                continue
            pool, tables, lens, q, out, plan = decode_case(kernels, batch, ctx)
            ours = cuda_time(lambda: kernels.decode(q, pool, tables, lens, out, plan=plan))
            k = torch.randn((batch, s.num_kv_heads, ctx, s.head_dim), device=DEV).to(_dt(s.dtype))
            v = torch.randn_like(k)
            q4 = q[:, :, None, :]
            sdpa = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
            kv_bytes = 2 * batch * ctx * s.num_kv_heads * s.head_dim * pool.element_size()
            gbps = kv_bytes / (ours * 1e-3) / 1e9
            # copy bandwidth counts read + write; decode only reads: compare bytes moved per second.
            row = {"spec": s.uri, "batch": batch, "ctx": ctx, "ours_us": ours * 1e3, "sdpa_us": sdpa * 1e3,
                   "speedup_vs_sdpa": sdpa / ours, "kv_gbps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps,
                   "num_splits": plan.num_splits, "package": package, "config": kernels.configs["decode"]}
            rows.append(row)
            print(f"  {batch:>5} {ctx:>6} {row['ours_us']:>9.1f} {row['sdpa_us']:>9.1f} {row['speedup_vs_sdpa']:>7.2f}x "
                  f"{gbps:>8.0f} {row['pct_copy_bw']:>6.1f}%", flush=True)
            pool = k = v = None  # free the GPU memory before the next shape
    return rows


def time_extend(kernels, package):
    s = kernels.spec
    rows = []
    print(f"\n  extend {s.uri} {json.dumps(kernels.configs['extend'], sort_keys=True)}: prefill of n new tokens "
          "per sequence (causal) vs torch SDPA", flush=True)
    for batch, n in ((1, 2048), (4, 1024)):
        bs = s.block_size
        nb = batch * n // bs + 1
        pool = torch.randn((nb, 2, s.num_kv_heads, bs, s.head_dim), device=DEV).to(_dt(s.kv_dtype))
        tables_np = (1 + np.random.permutation(nb - 1)).reshape(batch, -1).astype(np.int32)
        lens_np = np.full(batch, n, np.int32)
        indptr_np = (np.arange(batch + 1) * n).astype(np.int32)
        tables, lens, indptr = (torch.from_numpy(a).to(DEV) for a in (tables_np, lens_np, indptr_np))
        q = torch.randn((batch * n, s.num_q_heads, s.head_dim), device=DEV).to(_dt(s.dtype))
        out = torch.empty_like(q)
        plan = kernels.plan_extend(tables_np, indptr_np, lens_np, nb)
        ours = cuda_time(lambda: kernels.extend(q, pool, tables, indptr, lens, out, plan=plan), reps=5)
        qq = torch.randn((batch, s.num_q_heads, n, s.head_dim), device=DEV).to(_dt(s.dtype))
        k = torch.randn((batch, s.num_kv_heads, n, s.head_dim), device=DEV).to(_dt(s.dtype))
        sdpa = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(qq, k, k, is_causal=True, enable_gqa=True), reps=5)
        flops = 4 * batch * s.num_q_heads * s.head_dim * n * (n + 1) / 2
        row = {"spec": s.uri, "batch": batch, "new_tokens": n, "ours_ms": ours, "sdpa_ms": sdpa,
               "ours_tflops": flops / (ours * 1e-3) / 1e12, "sdpa_tflops": flops / (sdpa * 1e-3) / 1e12,
               "package": package, "config": kernels.configs["extend"]}
        rows.append(row)
        print(f"  batch {batch} x {n}: ours {ours:.3f} ms ({row['ours_tflops']:.1f} TFLOP/s), "
              f"sdpa {sdpa:.3f} ms ({row['sdpa_tflops']:.1f} TFLOP/s)", flush=True)
    return rows


def sync():
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()


def _dt(name):
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


if __name__ == "__main__":
    sys.exit(main())
