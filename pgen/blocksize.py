"""Block-size co-tuning: kernel time per block size, combined with a memory model of the workload.

For each block size the decode (and extend) kernels are tuned on a spec with that block size, and
the memory a workload's sequences hold is modelled from its length distribution:

- fragmentation: the last block of a sequence is partly empty; expected wasted slots
  E[(bs - len % bs) % bs], as a fraction of the tokens held;
- block tables: 4 bytes per block per sequence, relative to one layer's KV bytes (an upper bound:
  the table serves every layer);
- copy-on-write: a fork (beam search, parallel sampling) copies the partly filled last block, a
  whole block of bytes holding bs/2 tokens on average; `forks_per_seq` forks per sequence.

score = kernel factor x memory factor, lower is better. The kernel factor is the geometric mean of
each kernel's best time over the fastest block size's; the memory factor is the bytes held per
useful KV byte (1 + fragmentation + table + copy-on-write) over the smallest. When serving is
memory-bound, batch size scales as 1 / memory and step time as the kernel time, so the score is
the inverse of tokens per second per byte, relative to the best block size on each axis.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pgen_runtime.errors import TuneError
from pgen_runtime.spec import AttentionSpec

from . import tuning_log
from .target import BuildTarget, parse_targets
from .tune import TUNABLE, Runner, open_log, tune

SAMPLES = 20000  # draws from a parametric length distribution (seeded, so the study is repeatable)
TABLE_ENTRY_BYTES = 4


def length_samples(workload: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Sequence lengths of a workload's `lengths` section and its forks per sequence.

    `lengths` holds one of `samples = [...]` (observed lengths), `uniform = {min, max}` or
    `lognormal = {median, sigma, max}`, and optionally `forks_per_seq` (default 0). Without a
    `lengths` section, decode's `seq_lens` are the samples.

    Raises:
        TuneError: no lengths, or a malformed distribution.
    """
    spec = workload.get("lengths")
    if spec is None:
        lens = workload.get("decode", {}).get("seq_lens")
        if not lens:
            raise TuneError("block-size co-tuning needs lengths: add a [lengths] section (samples = [...], "
                            "uniform = {min, max} or lognormal = {median, sigma, max}) or decode.seq_lens")
        return np.asarray(lens, np.int64), 0.0
    forks = float(spec.get("forks_per_seq", 0))
    rng = np.random.default_rng(0)
    try:
        if "samples" in spec:
            lens = np.asarray(spec["samples"], np.int64)
        elif "uniform" in spec:
            lens = rng.integers(int(spec["uniform"]["min"]), int(spec["uniform"]["max"]) + 1, SAMPLES)
        elif "lognormal" in spec:
            p = spec["lognormal"]
            draws = rng.lognormal(math.log(float(p["median"])), float(p["sigma"]), SAMPLES)
            lens = np.clip(np.rint(draws), 1, int(p.get("max", 1 << 20))).astype(np.int64)
        else:
            raise KeyError("samples, uniform or lognormal")
    except (KeyError, TypeError, ValueError) as err:
        raise TuneError(f"workload lengths {spec!r} is malformed ({err}); use samples = [...], "
                        "uniform = {min = 1, max = 4096} or lognormal = {median = 1024, sigma = 1.0, max = 32768}") from None
    if lens.size == 0 or lens.min() < 1 or forks < 0:
        raise TuneError(f"workload lengths must be positive and forks_per_seq >= 0; got min {lens.min(initial=0)} "
                        f"and forks_per_seq {forks}")
    return lens, forks


def memory_model(spec: AttentionSpec, block_size: int, lens: np.ndarray, forks_per_seq: float) -> dict[str, float]:
    """Memory cost of `block_size` over sequence lengths `lens` (per sequence, one layer)."""
    token_bytes = spec.block_bytes / spec.block_size
    blocks = -(-lens // block_size)
    waste = float(np.mean((block_size - lens % block_size) % block_size))
    useful = float(np.mean(lens)) * token_bytes
    table = TABLE_ENTRY_BYTES * float(np.mean(blocks))
    cow = forks_per_seq * block_size * token_bytes
    return {
        "wasted_slots": waste,
        "fragmentation": waste * token_bytes / useful,
        "table_overhead": table / useful,
        "cow_bytes_per_fork": block_size * token_bytes,
        "cow_overhead": cow / useful,
        "bytes_per_useful_byte": 1 + waste * token_bytes / useful + table / useful + cow / useful,
    }


def study(spec: AttentionSpec, block_sizes: list[int], workload: dict[str, Any],
          target: str | BuildTarget = "llvm", kernels: tuple[str, ...] = TUNABLE, trials: int = 4,
          log_root: Path | None = None, jobs: int = 2, progress: Callable[[str], None] | None = None,
          runner: Runner | None = None) -> dict[str, Any]:
    """Tune `kernels` at every block size, model memory, score, and store the study in `spec`'s log.

    Returns:
        {"block_sizes": [row per block size], "recommended": bs, "log": path, ...}; each row holds
        the kernel times, the memory model's terms and the score.
    """
    target = parse_targets(target)[0] if isinstance(target, str) else target
    if not block_sizes:
        raise TuneError("--block-sizes is empty; give e.g. 8,16,32,64")
    lens, forks = length_samples(workload)
    workloads = {k: workload[k] for k in kernels if k in workload}
    rows = []
    for bs in block_sizes:
        try:
            variant = dataclasses.replace(spec, block_size=bs)
        except ValueError as err:
            raise TuneError(f"--block-sizes: {err}") from None
        path = tune(variant, target, kernels, trials, workloads, log_root, jobs, progress, runner)
        log = tuning_log.load(path, variant, target.kind)
        best = tuning_log.best(log)
        times = {k: best[k][1] if k in best else math.inf for k in kernels}
        rows.append({"block_size": bs, "times_ms": times, "configs": {k: best[k][0] for k in best},
                     "log": path.name, **memory_model(spec, bs, lens, forks)})
    _score(rows, kernels)
    finite = [r for r in rows if math.isfinite(r["score"])]
    if not finite:
        raise TuneError("every block size failed to build or run; see the tuning logs' errors")
    result = {"block_sizes": rows, "recommended": min(finite, key=lambda r: r["score"])["block_size"],
              "lengths": {"count": int(lens.size), "mean": float(lens.mean()), "p50": float(np.median(lens)),
                          "p99": float(np.percentile(lens, 99)), "max": int(lens.max())},
              "forks_per_seq": forks, "kernels": list(kernels)}
    for r in rows:  # failed block sizes: null in JSON, as failed candidates are
        r["times_ms"] = {k: t if math.isfinite(t) else None for k, t in r["times_ms"].items()}
        r.update({k: None for k in ("kernel_factor", "score") if not math.isfinite(r[k])})
    result["log"] = str(_store(spec, target, result, log_root, path, log["device"]))
    return result


def table(result: dict[str, Any]) -> str:
    """The numbers behind the recommendation, one row per block size."""
    kernels = result["kernels"]
    head = (["bs"] + [f"{k} ms" for k in kernels] +
            ["kernel x", "waste slots", "frag %", "table %", "cow KiB/fork", "cow %", "memory x", "score"])
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for r in result["block_sizes"]:
        cells = [str(r["block_size"])] + [_num(r["times_ms"][k], ".4f") for k in kernels] + [
            _num(r["kernel_factor"], ".3f"), f"{r['wasted_slots']:.1f}", f"{100 * r['fragmentation']:.2f}",
            f"{100 * r['table_overhead']:.4f}", f"{r['cow_bytes_per_fork'] / 1024:.1f}",
            f"{100 * r['cow_overhead']:.2f}", f"{r['memory_factor']:.3f}", _num(r["score"], ".3f")]
        mark = "  <- recommended" if r["block_size"] == result["recommended"] else ""
        lines.append("  ".join(f"{c:>12}" for c in cells) + mark)
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "failed" if value is None else format(value, fmt)


def _score(rows: list[dict[str, Any]], kernels: tuple[str, ...]) -> None:
    fastest = {k: min(r["times_ms"][k] for r in rows) for k in kernels}
    least = min(r["bytes_per_useful_byte"] for r in rows)
    for r in rows:
        ratios = [r["times_ms"][k] / fastest[k] for k in kernels]
        r["kernel_factor"] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if all(map(math.isfinite, ratios)) else math.inf
        r["memory_factor"] = r["bytes_per_useful_byte"] / least
        r["score"] = r["kernel_factor"] * r["memory_factor"]


def _store(spec: AttentionSpec, target: BuildTarget, result: dict[str, Any], log_root: Path | None,
           tuned: Path, device: dict[str, Any]) -> Path:
    """Keep the study in the log of `spec` itself (created empty when its block size was not tuned)."""
    path = tuning_log.log_path(spec, tuned.parent.name, log_root)
    log = open_log(path, spec, target, device)
    log["block_size_study"] = {k: v for k, v in result.items() if k != "log"}
    tuning_log.save(path, log)
    return path
