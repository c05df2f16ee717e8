"""Memory benchmark of the paged KV cache manager: waste, capacity, sharing and manager overhead.

Trace (seedable, ShareGPT-like): prompt and output lengths are independent log-normals whose
means match the ShareGPT statistics reported in the vLLM paper (Kwon et al., SOSP 2023: input
161, output 338 tokens): prompt ~ LogNormal(mu, 1.0) with mean 161, output ~ LogNormal(mu, 0.9)
with mean 338 (mu = ln(mean) - sigma^2 / 2), rounded, prompt clipped to [4, 1024] and output to
[1, MAX_LEN - prompt], with MAX_LEN = 2048 the model's context.

What it measures, all on one continuous-batching loop (admit while memory allows, one token per
running sequence per step, preempt the newest sequence when memory runs out):
  - contiguous pre-allocation of MAX_LEN slots per sequence vs the paged manager, at the same KV
    memory: utilization (live token slots / reserved slots) averaged over the steps where requests
    wait (memory-bound), and the most sequences running at once;
  - memory saved by sharing: 1 - blocks used / blocks the same tables would use unshared, averaged
    over steps, for parallel sampling (n samples forked from the prompt, each with its own output
    length) and beam search (every step each new beam continues a parent drawn uniformly from the
    current beams; beams then share all but a few recent blocks, so this sits near the 1 - 1/width
    bound, above a real search whose beams stay apart longer);
  - the manager's own time per decode step at batch 64 (append one token to each sequence, build
    the block tables and the slot mapping), against one decode step of pgen's CPU kernel when
    `pgen.build_kernels` is available.

Usage: python bench/memory.py [--seed 0] [--requests 1000] [--out bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from pathlib import Path

import numpy as np

from pgen_runtime import AttentionSpec, KVCacheManager

MAX_LEN = 2048
BLOCK_SIZE = 16
PROMPT_MEAN, PROMPT_SIGMA = 161.0, 1.0
OUTPUT_MEAN, OUTPUT_SIGMA = 338.0, 0.9
# A Llama-3-8B-like attention layer for the decode-step comparison.
DECODE_SPEC = AttentionSpec(
    num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=BLOCK_SIZE, dtype="float32"
)


def make_trace(num_requests: int, seed: int) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs of the ShareGPT-like trace described above."""
    rng = np.random.default_rng(seed)

    def lognormal(mean: float, sigma: float) -> np.ndarray:
        return rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, num_requests).round().astype(int)

    prompts = np.clip(lognormal(PROMPT_MEAN, PROMPT_SIGMA), 4, 1024)
    outputs = np.clip(lognormal(OUTPUT_MEAN, OUTPUT_SIGMA), 1, MAX_LEN - prompts)
    return list(zip(prompts.tolist(), outputs.tolist()))


def run_contiguous(trace: list[tuple[int, int]], capacity: int) -> dict[str, float]:
    """Each admitted sequence reserves MAX_LEN slots up front, as without paging."""
    slots = capacity // MAX_LEN
    waiting, running, utils, counts, peak = deque(trace), [], [], [], 0
    while waiting or running:
        while waiting and len(running) < slots:
            prompt, output = waiting.popleft()
            running.append([prompt, output])
        peak = max(peak, len(running))
        if waiting:
            utils.append(sum(r[0] for r in running) / (len(running) * MAX_LEN))
            counts.append(len(running))
        for r in running:
            r[0], r[1] = r[0] + 1, r[1] - 1
        running = [r for r in running if r[1] > 0]
    return _summary(utils, counts, peak)


def run_paged(trace: list[tuple[int, int]], capacity: int) -> dict[str, float]:
    """The same loop on the manager; out of blocks, the newest sequence is preempted by recompute."""
    m = KVCacheManager(capacity // BLOCK_SIZE + 1, BLOCK_SIZE, enable_prefix_caching=False)
    # (seq id, tokens to prefill, tokens left to generate, preempted before)
    waiting = deque((i, p, o, False) for i, (p, o) in enumerate(trace))
    running: dict[int, int] = {}  # seq id -> tokens left to generate, oldest first
    utils, counts, peak = [], [], 0
    while waiting or running:
        while waiting and m.can_allocate(waiting[0][0], waiting[0][1]):
            seq_id, prefill, output, again = waiting.popleft()
            m.allocate_slots(seq_id, prefill, None if again else list(range(prefill)))
            running[seq_id] = output
        peak = max(peak, len(running))
        if waiting:
            utils.append(m.metrics().utilization)
            counts.append(len(running))
        _decode_step(m, running, waiting)
    return _summary(utils, counts, peak)


def _summary(utils: list[float], counts: list[int], peak: int) -> dict[str, float]:
    """Means over the memory-bound steps (requests waiting), and the peak batch."""
    return {
        "utilization": float(np.mean(utils)),
        "mean_concurrent": float(np.mean(counts)),
        "max_concurrent": peak,
    }


def _decode_step(m: KVCacheManager, running: dict[int, int], waiting: deque) -> None:
    for seq_id in list(running):
        while seq_id in running and m.allocate_slots(seq_id, 1, [seq_id & 0xFFFF]) is None:
            victim = next(reversed(running))
            m.preempt(victim, "recompute")
            waiting.appendleft((victim, m.num_tokens(victim), running.pop(victim), True))
        if seq_id in running:
            running[seq_id] -= 1
            if running[seq_id] == 0:
                m.free(seq_id)
                del running[seq_id]


def sharing_savings(trace: list[tuple[int, int]], mode: str, width: int, seed: int) -> dict[str, float]:
    """Memory saved by sharing blocks between the samples or beams of each request."""
    rng = np.random.default_rng(seed)
    need = sum(-(-(p + o) // BLOCK_SIZE) * width for p, o in trace) + 1
    m = KVCacheManager(need + 1, BLOCK_SIZE, enable_prefix_caching=False, watermark=0.0)
    groups, next_id = [], 0
    for prompt, output in trace:
        m.allocate_slots(next_id, prompt)
        ids = [next_id] + list(range(next_id + 1, next_id + width))
        for child in ids[1:]:
            m.fork(next_id, child)
        lens = [output] * width if mode == "beam" else rng.choice([o for _, o in trace], width).tolist()
        groups.append([ids, lens, 0])
        next_id += width
    used = unshared = 0
    while groups:
        if mode == "beam":
            next_id = _reselect_beams(m, groups, rng, next_id)
        for group in groups:
            ids, lens, step = group
            for seq_id, length in zip(ids, lens):
                if step < length:
                    m.allocate_slots(seq_id, 1)
            group[2] += 1
        used += m.block_pool.num_used
        unshared += sum(len(m.block_table(s)) for g in groups for s in g[0])
        for group in [g for g in groups if g[2] >= max(g[1])]:
            for seq_id in group[0]:
                m.free(seq_id)
            groups.remove(group)
    return {"saved": 1 - used / unshared, "cow_copies": m.metrics().cow_copies}


def _reselect_beams(m: KVCacheManager, groups: list, rng: np.random.Generator, next_id: int) -> int:
    """Each new beam continues a parent drawn from the current beams; unchosen beams end."""
    for group in groups:
        beams = group[0]
        parents = rng.integers(0, len(beams), len(beams))
        kept, new = set(), []
        for parent in parents.tolist():
            if parent not in kept:
                kept.add(parent)
                new.append(beams[parent])
            else:
                m.fork(beams[parent], next_id)
                new.append(next_id)
                next_id += 1
        for i, seq_id in enumerate(beams):
            if i not in kept:
                m.free(seq_id)
        group[0] = new
    return next_id


def manager_step_time(trace: list[tuple[int, int]], batch: int, steps: int) -> dict[str, float]:
    """Median seconds of the manager's work in one decode step of `batch` sequences."""
    lens = [p for p, _ in trace[:batch]]
    m = KVCacheManager(sum(-(-(n + steps) // BLOCK_SIZE) for n in lens) + 1, BLOCK_SIZE, watermark=0.0)
    for seq_id, n in enumerate(lens):
        m.allocate_slots(seq_id, n, list(range(n)))
    ids, ones, times = list(range(batch)), [1] * batch, []
    for step in range(steps):
        start = time.perf_counter()
        for seq_id in ids:
            m.allocate_slots(seq_id, 1, [step])
        m.block_tables(ids)
        m.slot_mappings(ids, ones)
        times.append(time.perf_counter() - start)
    return {"seconds": float(np.median(times)), "mean_context": float(np.mean(lens)) + steps / 2}


def decode_step_time(batch: int, context: int) -> tuple[float | None, str]:
    """Seconds of one decode call of pgen's CPU kernel at this batch and context, or why not."""
    try:
        import pgen

        kernels = pgen.build_kernels(DECODE_SPEC, target="llvm")
    except Exception as err:  # the compiler side is optional for this benchmark
        return None, f"pgen.build_kernels unavailable ({type(err).__name__}: {err})"
    s = DECODE_SPEC
    per_seq = -(-context // s.block_size)
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((batch * per_seq + 1, 2, s.num_kv_heads, s.block_size, s.head_dim), np.float32)
    tables = (1 + np.arange(batch * per_seq, dtype=np.int32)).reshape(batch, per_seq)
    q = rng.standard_normal((batch, s.num_q_heads, s.head_dim), np.float32)
    out = np.empty_like(q)
    lens = np.full(batch, context, np.int32)
    try:
        kernels.decode(q, pool, tables, lens, out)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            kernels.decode(q, pool, tables, lens, out)
            times.append(time.perf_counter() - start)
    except Exception as err:
        return None, f"pgen decode call failed ({type(err).__name__}: {err})"
    return float(np.median(times)), f"pgen CPU decode, {s.uri}, batch {batch}, context {context}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--capacity", type=int, default=32 * MAX_LEN, help="KV memory in token slots")
    parser.add_argument("--out", default="bench/results/memory.json")
    args = parser.parse_args(argv)
    trace = make_trace(args.requests, args.seed)
    results = {"seed": args.seed, "requests": args.requests, "capacity_tokens": args.capacity}
    prompts, outputs = zip(*trace)
    results["trace"] = {"mean_prompt": float(np.mean(prompts)), "mean_output": float(np.mean(outputs))}
    results["contiguous"] = run_contiguous(trace, args.capacity)
    results["paged"] = run_paged(trace, args.capacity)
    share_trace = trace[:200]
    results["sharing"] = {
        f"{mode}_{w}": sharing_savings(share_trace, mode, w, args.seed)
        for mode in ("parallel", "beam")
        for w in (2, 4, 6)
    }
    step = manager_step_time(trace, 64, 200)
    decode_s, decode_note = decode_step_time(64, int(step["mean_context"]))
    results["manager_step"] = dict(step, decode_seconds=decode_s, decode_note=decode_note)
    if decode_s:
        results["manager_step"]["share_of_decode"] = step["seconds"] / decode_s
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(r: dict) -> None:
    print(f"trace: {r['requests']} requests, mean prompt {r['trace']['mean_prompt']:.0f}, "
          f"mean output {r['trace']['mean_output']:.0f}; KV memory {r['capacity_tokens']} token slots")
    print(f"{'layout':<12}{'utilization':>12}{'mean concurrent':>17}{'max concurrent':>16}")
    for name in ("contiguous", "paged"):
        x = r[name]
        print(f"{name:<12}{x['utilization']:>12.1%}{x['mean_concurrent']:>17.1f}{x['max_concurrent']:>16}")
    print(f"{'sharing':<12}{'memory saved':>14}{'COW copies':>12}")
    for name, s in r["sharing"].items():
        print(f"{name:<12}{s['saved']:>14.1%}{s['cow_copies']:>12}")
    step = r["manager_step"]
    print(f"manager time per decode step at batch 64: {step['seconds'] * 1e3:.3f} ms")
    if step["decode_seconds"]:
        print(f"one decode step: {step['decode_seconds'] * 1e3:.3f} ms ({step['decode_note']}); "
              f"manager share {step['share_of_decode']:.2%}")
    else:
        print(f"no decode-step comparison: {step['decode_note']}")


if __name__ == "__main__":
    main()
