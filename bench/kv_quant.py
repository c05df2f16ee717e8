"""Quantized KV cache benchmark: int8 and fp8 e4m3 decode against fp16 KV, side by side in one run.

Llama-3-8B attention shape (32 q heads, 8 KV heads, head_dim 128), block size 16, float16 queries.
For each batch x context it builds one pool per kv_dtype (float16, int8, fp8_e4m3), each far larger
than L3 with blocks in random order (bench/kernels.py's `Case`), and times paged decode in rounds
that interleave the three with a streaming read of this machine's memory (torch, all threads):
the machine's bandwidth moves within minutes, so every ratio is taken within one round and the
table gives the median over rounds. `%read` is the pool bytes a call reads per second against that
round's read rate.

Accuracy: on random K/V values (standard normal, 4 sequences of 1024 tokens) it reports the max and
mean absolute error of each cache's attention output against the float64 attention of the
unquantized values (the fp16 row is fp16 KV's own rounding); and on the tiny model (pgen.tiny, fp32)
compiled once per kv_dtype, the greedy tokens of 4 prompts x 64 new tokens against the float32
cache's: the share of tokens equal and the first position where each prompt's tokens part (the
float16 row shows how soon mere fp16 rounding parts them: a random-weight model's logits are nearly
tied). Prints
three tables and writes JSON (default bench/results/kv_quant.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
from kernels import Bandwidth, Case, best_ms

import pgen
from pgen.reference import paged_case
from pgen_runtime import kv_quant
from pgen_runtime.reference import decode as reference_decode

SPEC = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")
KV_DTYPES = ("float16", "int8", "fp8_e4m3")


def speed(kernels: dict, torch, batch: int, ctx: int, rounds: int, max_pool: int, rng) -> dict:
    bw = Bandwidth(torch)
    cases = {kv: Case(k.spec, batch, ctx, rng, max_pool) for kv, k in kernels.items()}
    plans = {kv: kernels[kv].plan_decode(c.tables[0], c.lens) for kv, c in cases.items()}
    times: dict[str, list[float]] = {"read_gbps": [], **{kv: [] for kv in kernels}}
    for _ in range(rounds):
        times["read_gbps"].append(bw.read_gbps())
        for kv, c in cases.items():
            times[kv].append(best_ms(lambda: kernels[kv].decode(c.q, c.pool, c.next_tables(False), c.lens, c.out,
                                                                plan=plans[kv]), repeats=5))
    row = {"batch": batch, "ctx": ctx, "read_gbps": float(np.median(times["read_gbps"]))}
    for kv, c in cases.items():
        ms = np.array(times[kv])
        row[kv] = {"ms": float(np.median(ms)), "tokens_per_s": batch / float(np.median(ms)) * 1e3,
                   "kv_mb": c.kv_bytes / 2**20, "num_splits": plans[kv].num_splits,
                   "pct_read": float(np.median(100 * c.kv_bytes / ms / 1e6 / np.array(times["read_gbps"]))),
                   "speedup_vs_f16": float(np.median(np.array(times["float16"]) / ms))}
    return row


def accuracy(kernels: dict, rng) -> dict:
    spec16 = kernels["float16"].spec
    case = paged_case(spec16, [1024] * 4, seed=7)
    values = np.nan_to_num(case["pool"].astype(np.float32), nan=0.0)
    q, tables, lens = case["q_decode"], case["block_tables"], case["seq_lens"]
    exact = reference_decode(spec16, q, values.astype(np.float64), tables, lens)
    out = {}
    for kv, k in kernels.items():
        pool = kv_quant.quantize_pool(k.spec, values) if k.spec.kv_quantized else values.astype(kv)
        got = np.empty_like(q)
        k.decode(q, pool, tables, lens, got)
        err = np.abs(got.astype(np.float64) - exact)
        out[kv] = {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
                   "max_abs_out": float(np.abs(exact).max())}
    return out


def model_agreement(prompts: int = 4, tokens: int = 64) -> dict:
    """Greedy tokens of the tiny model with a quantized cache against its float32 cache."""
    import tempfile

    from pgen.onnx import compile_model
    from pgen.run import models_root
    from pgen.tiny import TinyConfig, export
    from pgen_runtime import LLM, SamplingParams

    config = TinyConfig()
    onnx_path = models_root() / f"{config.name}.onnx"
    if not onnx_path.is_file():
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        export(onnx_path, config)
    rng = np.random.default_rng(1)
    rows = [[int(t) for t in rng.integers(3, config.vocab, n)] for n in (5, 17, 33, 64)][:prompts]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kv in ("float32", *KV_DTYPES):
            package = compile_model(onnx_path, Path(tmp) / f"tiny_{kv}.pgenpkg", kv_dtype=kv, progress=lambda _: None)
            got[kv] = [o.token_ids for o in LLM(package).generate(rows, params)]
    out = {}
    for kv in KV_DTYPES:
        same = [int(np.sum(np.array(a) == np.array(b))) for a, b in zip(got[kv], got["float32"])]
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), tokens) for a, b in zip(got[kv], got["float32"])]
        out[kv] = {"tokens_equal_pct": 100 * sum(same) / (tokens * len(rows)), "first_difference": first}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kv_quant.json"))
    parser.add_argument("--cases", default="16x8192,32x4096,4x16384", help="batch x context, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-pool-gib", type=float, default=2.0)
    args = parser.parse_args()
    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    kernels = {kv: pgen.build_kernels(pgen.AttentionSpec(**SPEC, kv_dtype=kv)) for kv in KV_DTYPES}
    print(f"threads {threads}; {platform.processor() or platform.machine()}; decode, paged, blocks in random order")
    print(f"{'B':>4}{'ctx':>7}{'read GB/s':>10}" + "".join(f"{kv + ' ms':>14}{'%read':>7}{'x f16':>7}" for kv in KV_DTYPES))
    rows = []
    for text in args.cases.split(","):
        batch, ctx = map(int, text.split("x"))
        row = speed(kernels, torch, batch, ctx, args.rounds, int(args.max_pool_gib * 2**30), rng)
        rows.append(row)
        print(f"{batch:>4}{ctx:>7}{row['read_gbps']:>10.1f}" + "".join(
            f"{row[kv]['ms']:>14.3f}{row[kv]['pct_read']:>6.0f}%{row[kv]['speedup_vs_f16']:>7.2f}" for kv in KV_DTYPES),
            flush=True)
    acc = accuracy(kernels, rng)
    print(f"\n{'kv_dtype':<10}{'max abs err':>12}{'mean abs err':>14}   (decode output vs float64 of unquantized K/V; "
          f"|out| <= {acc['float16']['max_abs_out']:.2f})")
    for kv, a in acc.items():
        print(f"{kv:<10}{a['max_abs_err']:>12.2e}{a['mean_abs_err']:>14.2e}")
    agree = model_agreement()
    print(f"\n{'kv_dtype':<10}{'tokens equal':>13}  first difference per prompt (of 64; tiny model, greedy, vs float32 KV)")
    for kv, a in agree.items():
        print(f"{kv:<10}{a['tokens_equal_pct']:>12.1f}%  {a['first_difference']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": threads, "spec": SPEC, "decode": rows, "accuracy": acc,
                                          "tiny_model_greedy": agree}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
