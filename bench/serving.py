"""Serving benchmark: pgen's paged KV + continuous batching vs static batching, and the server under load.

One trace (Poisson arrivals, ShareGPT-like log-normal prompt and output lengths) runs through
  (a) pgen: `Engine` with a paged KV pool, continuous batching, chunked prefill;
  (b) static batching: a contiguous KV region pre-allocated to max_model_len per sequence, at the
      same KV memory (so batch = pool tokens // max_model_len); a batch is formed from the requests
      that have arrived and runs until its longest member finishes; only then is the next admitted.
      Two variants: "padded" runs the batch as a dense implementation does (prompts left-padded to
      the longest, finished sequences keep decoding until the last one ends); "ragged" skips the
      padding and the finished sequences (a favourable baseline: on a CPU, idle slots cost nothing).
Both run the same compiled model with greedy decoding and ignore_eos, so both generate exactly the
trace's output lengths. `--model tiny` is `pgen run`'s default model (0.3M parameters): its layers
cost about as much as the Python engine's per-sequence work, which no served model does. `--model
small` (the default here; 12M parameters, 48 MB of fp32 weights, more than the 32 MiB L3) is
LLaMA-shaped like it but big enough that the model dominates each step, as in real serving. The default arrival rate is far
above what either system serves, so requests/s measures capacity: at a rate both keep up with, it
would only measure the trace's own rate. Then 200 concurrent clients hit `pgen serve` on loopback:
error rate, requests/s, latency and the server's resident memory.

    python bench/serving.py [--model small|tiny] [--requests 400] [--rate 1000] [--kv-tokens 8192]
                            [--clients 200] [--repeats 3]

Prints a table and writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pgen.run import default_package
from pgen.tiny import TinyConfig
from pgen_runtime import Engine, SamplingParams
from pgen_runtime.model import PagedModel, StepInputs

RESULTS = Path(__file__).parent / "results" / "serving.json"
MODELS = {"tiny": TinyConfig(),
          "small": TinyConfig(hidden=512, layers=4, q_heads=8, kv_heads=2, head_dim=64, ffn=1536)}


def trace(num: int, rate: float, max_model_len: int, seed: int = 0) -> list[dict]:
    """Requests with Poisson arrivals and ShareGPT-like lengths (log-normal, long-tailed), scaled down."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num))
    prompts = np.clip(rng.lognormal(np.log(60), 0.9, num), 4, max_model_len // 2).astype(int)
    outputs = np.clip(rng.lognormal(np.log(48), 0.8, num), 4, max_model_len // 2).astype(int)
    return [{"arrival": float(a), "prompt": [int(t) for t in rng.integers(3, 259, p)], "max_tokens": int(o)}
            for a, p, o in zip(arrivals, prompts, outputs)]


def summarize(name: str, rows: list[dict], seconds: float) -> dict:
    ttft = [r["first"] - r["arrival"] for r in rows]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in rows if r["tokens"] > 1]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    return {"system": name, "requests": len(rows), "seconds": seconds, "requests_per_s": len(rows) / seconds,
            "tokens_per_s": sum(r["tokens"] for r in rows) / seconds,
            **{f"ttft_p{q}_ms": pct(ttft, q) for q in (50, 90, 99)},
            **{f"tpot_p{q}_ms": pct(tpot, q) for q in (50, 90, 99)}}


def run_pgen(package: Path, requests: list[dict], num_blocks: int, max_model_len: int) -> dict:
    engine = Engine(package, num_blocks=num_blocks, max_num_batched_tokens=512, max_model_len=max_model_len)
    pending, outputs, start = list(requests), {}, time.monotonic()
    while pending or engine.has_unfinished:
        now = time.monotonic() - start
        while pending and pending[0]["arrival"] <= now:
            r = pending.pop(0)
            outputs[id(r)] = (r, engine.add_request(r["prompt"], SamplingParams(max_tokens=r["max_tokens"],
                                                                                ignore_eos=True)))
        if not engine.has_unfinished:
            time.sleep(max(0.0, pending[0]["arrival"] - now))
            continue
        engine.step()
    seconds = time.monotonic() - start
    rows = [{"arrival": r["arrival"], "first": o.first_token_time - start, "end": o.finished_time - start,
             "tokens": len(o.token_ids)} for r, o in outputs.values()]
    result = summarize("pgen paged + continuous", rows, seconds)
    result["kv"] = engine.manager.metrics().as_dict() | {"peak_blocks_used": engine.stats.peak_blocks_used}
    return result


def run_static(package: Path, requests: list[dict], num_blocks: int, max_model_len: int, padded: bool) -> dict:
    """Static batching over contiguous per-sequence KV regions of max_model_len tokens."""
    model = PagedModel(package, "cpu", num_blocks)
    block = model.spec.block_size
    per_seq = -(-max_model_len // block)
    batch_size = (num_blocks - 1) // per_seq
    pending, rows, start = list(requests), [], time.monotonic()
    while pending:
        now = time.monotonic() - start
        if pending[0]["arrival"] > now:
            time.sleep(pending[0]["arrival"] - now)
            continue
        batch = [pending.pop(0) for _ in range(min(batch_size, len(pending))) if pending[0]["arrival"] <= now]
        rows += _static_batch(model, batch, per_seq, start, padded)
    name = f"static {'padded' if padded else 'ragged'} (batch {batch_size})"
    return summarize(name, rows, time.monotonic() - start) | {"batch_size": batch_size}


def _static_batch(model: PagedModel, batch: list[dict], per_seq: int, start: float, padded: bool) -> list[dict]:
    block = model.spec.block_size
    tables = np.array([[1 + slot * per_seq + j for j in range(per_seq)] for slot in range(len(batch))], np.int32)
    longest = max(len(r["prompt"]) for r in batch) if padded else 0
    tokens = [[0] * (longest - len(r["prompt"])) + list(r["prompt"]) for r in batch]
    done = [0] * len(batch)  # tokens whose KV is written
    made = [[] for _ in batch]
    rows = [{"arrival": r["arrival"], "first": None, "end": None, "tokens": 0} for r in batch]
    while True:
        live = [i for i, r in enumerate(batch) if len(made[i]) < r["max_tokens"]]
        if not live:
            return rows
        live = list(range(len(batch))) if padded else live
        new = [tokens[i][done[i]:] for i in live]
        indptr = np.concatenate([[0], np.cumsum([len(n) for n in new])]).astype(np.int32)
        positions = np.concatenate([np.arange(done[i], len(tokens[i])) for i in live])
        slots = np.concatenate([tables[i][positions_i // block] * block + positions_i % block
                                for i, positions_i in ((i, np.arange(done[i], len(tokens[i]))) for i in live)])
        logits = model.forward(StepInputs(np.concatenate(new).astype(np.int64), positions.astype(np.int64),
                                          tables[live], slots.astype(np.int32), indptr,
                                          np.array([len(tokens[i]) for i in live], np.int32)))
        now = time.monotonic() - start
        for i, row in zip(live, logits):
            done[i] = len(tokens[i])
            token = int(np.argmax(row))
            tokens[i].append(token)
            made[i].append(token)
            if len(made[i]) <= batch[i]["max_tokens"]:  # past it: padding of a finished sequence
                rows[i]["first"] = rows[i]["first"] or now
                rows[i]["tokens"] = len(made[i])
            if len(made[i]) == batch[i]["max_tokens"]:
                rows[i]["end"] = now


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_server(package: Path, clients: int, requests: list[dict]) -> dict:
    """`pgen serve` on 127.0.0.1 with `clients` concurrent streaming clients, one request each."""
    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pgen.cli", "serve", str(package), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    async def client(session, r: dict) -> tuple[bool, float]:
        t0 = time.monotonic()
        body = {"prompt": r["prompt"], "max_tokens": min(r["max_tokens"], 64), "temperature": 0,
                "ignore_eos": True, "stream": True}
        try:
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                ok = resp.status == 200
                async for line in resp.content:
                    ok = ok and b'"error"' not in line
            return ok, time.monotonic() - t0
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False, time.monotonic() - t0

    async def main() -> dict:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            for _ in range(300):
                try:
                    async with session.get(f"{url}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
            idle = _rss_mib(proc.pid)
            peak, t0 = idle, time.monotonic()
            tasks = [asyncio.create_task(client(session, requests[i % len(requests)])) for i in range(clients)]
            while not all(t.done() for t in tasks):
                peak = max(peak, _rss_mib(proc.pid))
                await asyncio.sleep(0.05)
            seconds = time.monotonic() - t0
            results = [t.result() for t in tasks]
        latencies = [s for _, s in results]
        errors = sum(not ok for ok, _ in results)
        return {"clients": clients, "errors": errors, "error_rate": errors / clients, "seconds": seconds,
                "requests_per_s": clients / seconds, "latency_p50_ms": float(np.percentile(latencies, 50)) * 1e3,
                "latency_p99_ms": float(np.percentile(latencies, 99)) * 1e3, "rss_idle_mib": idle,
                "rss_peak_mib": peak}

    try:
        result = asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        result_code = proc.wait(60)
    return result | {"exit_code_after_sigterm": result_code}


def table(a: dict, *baselines: dict) -> str:
    cols = ["requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"]
    lines = [f"{'system':<30}" + "".join(f"{c:>15}" for c in cols)]
    for r in (a, *baselines):
        lines.append(f"{r['system']:<30}" + "".join(f"{r[c]:>15.1f}" for c in cols))
    lines += [f"speedup (requests/s) over {b['system']}: {a['requests_per_s'] / b['requests_per_s']:.2f}x "
              "(target >= 3x)" for b in baselines]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=1000.0, help="Poisson arrival rate, requests/s")
    parser.add_argument("--kv-tokens", type=int, default=8192, help="KV memory of both systems, in tokens")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per system; the median is kept")
    parser.add_argument("-o", "--out", default=str(RESULTS))
    args = parser.parse_args()
    package = default_package(MODELS[args.model], progress=lambda line: print(line, flush=True))
    requests = trace(args.requests, args.rate, args.max_model_len)
    num_blocks = 1 + args.kv_tokens // 16
    print(f"{len(requests)} requests at {args.rate}/s, KV {args.kv_tokens} tokens, threads "
          f"{os.environ.get('TVM_NUM_THREADS', 'all')}", flush=True)
    # NOTE: the systems run interleaved, `--repeats` times, and each keeps its median run, so that
    # load from other processes on a shared machine hits all of them alike.
    runs = {"pgen": [], "padded": [], "ragged": []}
    for i in range(args.repeats):
        runs["pgen"].append(run_pgen(package, requests, num_blocks, args.max_model_len))
        runs["padded"].append(run_static(package, requests, num_blocks, args.max_model_len, padded=True))
        runs["ragged"].append(run_static(package, requests, num_blocks, args.max_model_len, padded=False))
        print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]['requests_per_s']:.1f} req/s"
                                                             for k, v in runs.items()), flush=True)
    a, padded, ragged = (sorted(v, key=lambda r: r["requests_per_s"])[len(v) // 2] for v in runs.values())
    print(table(a, padded, ragged), flush=True)
    offered = len(requests) / requests[-1]["arrival"]
    bound = [r["system"] for r in (a, padded, ragged) if r["requests_per_s"] >= 0.9 * offered]
    print(f"offered load {offered:.0f} requests/s" + (f"; arrival-bound (raise --rate): {', '.join(bound)}"
                                                      if bound else "; every system is saturated"), flush=True)
    server = run_server(package, args.clients, requests)
    print(f"server: {server['clients']} concurrent clients, {server['errors']} errors "
          f"({server['error_rate']:.1%}), {server['requests_per_s']:.1f} requests/s, latency p50 "
          f"{server['latency_p50_ms']:.0f} ms p99 {server['latency_p99_ms']:.0f} ms, RSS "
          f"{server['rss_idle_mib']:.0f} -> {server['rss_peak_mib']:.0f} MiB, exit {server['exit_code_after_sigterm']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    speedup = {b["system"]: a["requests_per_s"] / b["requests_per_s"] for b in (padded, ragged)}
    out.write_text(json.dumps({"args": vars(args), "offered_requests_per_s": offered, "runs": runs, "pgen": a, "static_padded": padded, "static_ragged": ragged,
                               "speedup_requests_per_s": speedup, "server": server}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
