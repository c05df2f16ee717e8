"""Autotuning: search a rule's knobs per target, measure, and keep the records in tuning_logs/.

Candidates are the rule's knob space pruned by `check` (the target's limits), default first, then a
seeded sample. Each is compiled alone into its own library (in parallel processes), then measured:
in this process for the CPU, on remote devices through TVM's RPC (`pgen.rpc`), or offline for
devices that cannot reach this host — `emit_bundle` writes every candidate plus the TVM runtime
into one folder that `python -m pgen_runtime.measure` times on the device, and `ingest` turns its
results into the same log an online run writes. Online runs spend half their trials on the sample
and the rest refining the fastest config found (`_refine`: configs one knob away from it,
hill-climbing). A candidate that fails to build or run gets no time (infinite) and the run goes
on. After the search the fastest few and the default are re-timed side by side (`_confirm`); the
log's best is chosen on those times. Runs resume: candidates already in the log for the same
workload are not measured again.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from pgen_runtime.errors import TuneError
from pgen_runtime.kernel_table import ATTENTION_KERNELS
from pgen_runtime.measure import BUNDLE, check_output, default_workload, make_checked_inputs, time_guard, time_kernel
from pgen_runtime.spec import AttentionSpec

from . import tuning_log
from .build import compile_functions, versions
from . import schedules
from .target import BuildTarget, host_target_id, parse_targets

TUNABLE = ATTENTION_KERNELS
# Knobs that cap what a kernel's plan chooses per call (the split-KV factor): tuning keeps their
# default. The tuning workload is one large batch that never reaches such a cap, so a searched
# value would be picked by noise, and a low one costs the calls that need it (H200: a tuned cap of
# 8 leaves one 16k-token sequence 8 splits of its 8 KV heads, 64 thread blocks on 132 SMs).
PLAN_CAPS = ("max_splits",)
CONFIRM_TOP, CONFIRM_ROUNDS = 3, 3  # fastest candidates re-timed with the default after a search
# NOTE: CPU knob spaces hold 10^5-10^6 configs (Llama-3-8B: decode 414,720, extend 3,110,400), so a
# sample of a dozen sees a few knobs' good values by chance. Online runs measure the sample, then
# spend this share of the trials on configs one knob away from the fastest so far.
REFINE_SHARE = 0.5
# Workers start fresh: forking a process that holds TVM's thread pool and CUDA state is unsafe.
_SPAWN = multiprocessing.get_context("spawn")


def candidates(spec: AttentionSpec, target: BuildTarget, kernel: str, trials: int, seed: int = 0) -> list[dict]:
    """Up to `trials` valid configs of `kernel`: the default, then a seeded sample of the rest (with
    the default's `PLAN_CAPS`) over every variant that supports the spec, the variants in turn, so
    one with a small space (the tensor-core kernels: a few configs beside hundreds of CUDA-core
    ones) is not crowded out.
    """
    default = schedules.default_config(kernel, spec, target.info)
    per_rule = []
    for rule in schedules.applicable(kernel, spec, target.info):
        rest = [c for c in rule.space(spec, target.info)
                if c != default and all(c.get(k, default.get(k)) == default.get(k) for k in PLAN_CAPS)]
        random.Random(seed).shuffle(rest)
        per_rule.append(rest)
    rest = [c for group in itertools.zip_longest(*per_rule) for c in group if c is not None]
    return [default] + rest[: max(trials - 1, 0)]


def sample_size(trials: int) -> int:
    """Candidates of the seeded sample in an online run of `trials` per kernel; the rest refine."""
    return max(1, trials - int(trials * REFINE_SHARE))


def neighbours(spec: AttentionSpec, target: BuildTarget, kernel: str, config: dict) -> list[dict]:
    """The valid configs of `config`'s variant one knob away from it (`PLAN_CAPS` kept), in knob order.

    Built from the knobs, not by scanning the space (millions of configs on the CPU).
    """
    rule = schedules.rule_for(kernel, spec, target.info, config)
    out = []
    for knob in rule.knobs(spec, target.info):
        if knob.name in PLAN_CAPS:
            continue
        for value in knob.choices:
            if value != config.get(knob.name):
                moved = {**config, knob.name: value}
                if rule.check(spec, target.info, moved) is None:
                    out.append(moved)
    return out


def candidate_key(kernel: str, config: dict, workload: dict, target_kind: str) -> str:
    """Identifies a measurement: kernel, knobs, workload and the schedule code that built it."""
    text = json.dumps([kernel, config, workload, tuning_log.schedule_version(kernel, target_kind, config["rule"])], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tune(spec: AttentionSpec, target: str | BuildTarget = "llvm", kernels: tuple[str, ...] = TUNABLE,
         trials: int = 8, workloads: dict[str, dict] | None = None, log_root: Path | None = None,
         jobs: int = 2, progress: Callable[[str], None] | None = None, runner: Runner | None = None) -> Path:
    """Tune `kernels` of `spec` and write (or extend) the device's tuning log.

    Args:
        runner: where candidates are timed: this host's CPU (default), or remote devices
            (`pgen.rpc.RpcRunner`). Builds always run here, `jobs` at a time.

    Returns:
        The log's path.

    Raises:
        TuneError: a CUDA target without a remote runner, or an unusable existing log.
    """
    target = parse_targets(target)[0] if isinstance(target, str) else target
    runner = runner or LocalRunner()
    if target.kind != "llvm" and isinstance(runner, LocalRunner):
        raise TuneError(f"tuning {target.name} needs its device: use --rpc-tracker, or --offline DIR on this "
                        "host, run the bundle's measuring script there, then --ingest the results")
    device = runner.device_info()
    path = tuning_log.log_path(spec, device_target_id(device), log_root)
    log = open_log(path, spec, target, device)
    # Records of older schedule code can never be used again (`tuning_log.current`): drop them so
    # the log holds this code's measurements only.
    log["records"] = tuning_log.current_records(log)
    todo = _pending(spec, target, kernels, sample_size(trials), workloads or {}, {r.get("key") for r in log["records"]})
    # Each kernel measures its sample's new candidates, then refines up to `trials` records.
    steps = {k: _workload(workloads or {}, k, target, spec) for k in kernels}
    have = {k: len(_records(log["records"], k, steps[k])) for k in kernels}
    total = sum(max(sum(c.kernel == k for c in todo), trials - have[k]) for k in kernels)
    bar = _Progress(total, progress)

    def record(cand: Candidate, result: dict[str, Any]) -> None:
        rec = {"kernel": cand.kernel, "config": cand.config, "workload": cand.workload, "key": cand.key,
               "default": cand.default, "schedule": tuning_log.schedule_version(cand.kernel, target.kind, cand.config["rule"]), **result}
        log["records"].append(rec)
        tuning_log.save(path, log)
        bar.step(rec)

    _build_and_time(spec, target, todo, runner, jobs, record)
    for kernel in kernels:
        _refine(spec, target, log, kernel, steps[kernel], trials, runner, jobs, record)
    for kernel in kernels:
        if _confirm(spec, target, log, kernel, steps[kernel], runner):
            tuning_log.save(path, log)
    return path


def _records(records: list[dict[str, Any]], kernel: str, workload: dict) -> list[dict[str, Any]]:
    return [r for r in records if r["kernel"] == kernel and r.get("workload") == workload]


def _fastest_first(records: list[dict[str, Any]], log: dict[str, Any]) -> list[dict[str, Any]]:
    """The records that may compete or be climbed from, fastest first: measured, not failed, within
    the guard (`tuning_log.within_guard`)."""
    ok = (r for r in tuning_log.within_guard(records, log) if r["median_ms"] is not None and not r.get("error"))
    return sorted(ok, key=lambda r: r["median_ms"])


def _refine(spec: AttentionSpec, target: BuildTarget, log: dict[str, Any], kernel: str, workload: dict, trials: int,
            runner: Runner, jobs: int, record: Callable[[Candidate, dict[str, Any]], None], seed: int = 0) -> None:
    """Measure configs one knob away from the fastest record until the kernel has `trials` records
    on `workload`, `jobs` at a time (the fastest is looked up again after each batch: hill-climbing).

    Where every neighbour of the fastest is measured (a local optimum), the next fastest's are
    taken; the search ends early when no measured record has an unmeasured neighbour. Configs
    outside the guard (`tuning_log.within_guard`) and failed ones are never climbed from.
    """
    rng = random.Random(seed)
    default = schedules.default_config(kernel, spec, target.info)
    while (left := trials - len(recs := _records(log["records"], kernel, workload))) > 0:
        done = {r.get("key") for r in recs}
        batch: list[Candidate] = []
        for rec in _fastest_first(recs, log):
            if fresh := _fresh_neighbours(spec, target, kernel, workload, rec["config"], done):
                rng.shuffle(fresh)
                batch = [Candidate(kernel, c, workload, k, c == default) for c, k in fresh[:max(1, min(jobs, left))]]
                break
        if not batch:
            return
        _build_and_time(spec, target, batch, runner, jobs, record)


def _fresh_neighbours(spec: AttentionSpec, target: BuildTarget, kernel: str, workload: dict, config: dict,
                      done: set) -> list[tuple[dict, str]]:
    """`config`'s neighbours whose candidate keys on `workload` are not in `done`, with those keys."""
    return [(c, k) for c in neighbours(spec, target, kernel, config)
            if (k := candidate_key(kernel, c, workload, target.kind)) not in done]


def _confirm(spec: AttentionSpec, target: BuildTarget, log: dict[str, Any], kernel: str, workload: dict,
             runner: Runner) -> bool:
    """Re-time the fastest few and the default together, in rounds, and keep each one's fastest round.

    NOTE: on a shared machine one search timing can be off by 2x either way; timings taken side by
    side in rounds see the same load, so their ratio holds. Returns whether anything was re-timed.
    """
    recs = _records(log["records"], kernel, workload)
    ok = _fastest_first(recs, log)
    finalists = ok[:CONFIRM_TOP] + [r for r in ok[CONFIRM_TOP:] if r.get("default")]
    if not finalists or all(r.get("confirm_ms") is not None for r in finalists):
        return False
    for rec in recs:  # confirmations of an earlier run saw another load: start over
        rec.pop("confirm_ms", None), rec.pop("confirm_times_ms", None)
    for _ in range(CONFIRM_ROUNDS):
        for rec in finalists:
            cand = Candidate(kernel, rec["config"], workload, rec["key"], bool(rec.get("default")))
            library = _scratch(spec, target) / rec["key"] / "kernels.so"
            if not library.is_file():  # another machine, or a cleaned cache
                library = _build_candidate(spec, target, kernel, rec["config"], library.parent)
            t = _time(runner, spec, cand, library)["median_ms"]
            rec.setdefault("confirm_times_ms", []).append(t if t is not None else math.inf)
    for rec in finalists:
        rec["confirm_ms"] = min(rec["confirm_times_ms"]) if math.isfinite(min(rec["confirm_times_ms"])) else None
        rec["confirm_times_ms"] = [t if math.isfinite(t) else None for t in rec["confirm_times_ms"]]
    return True


def _workload(workloads: dict[str, dict], kernel: str, target: BuildTarget, spec: AttentionSpec) -> dict[str, Any]:
    return workloads.get(kernel) or default_workload(kernel, "cuda" if target.kind == "cuda" else "cpu", spec)


def _pending(spec: AttentionSpec, target: BuildTarget, kernels: tuple[str, ...], trials: int,
             workloads: dict[str, dict], done: set[str]) -> list[Candidate]:
    todo = []
    for kernel in kernels:
        workload = _workload(workloads, kernel, target, spec)
        default = schedules.default_config(kernel, spec, target.info)
        for config in candidates(spec, target, kernel, trials):
            key = candidate_key(kernel, config, workload, target.kind)
            if key not in done:
                todo.append(Candidate(kernel, config, workload, key, config == default))
    return todo


def _build_and_time(spec: AttentionSpec, target: BuildTarget, todo: list[Candidate], runner: Runner, jobs: int,
                    record: Callable[[Candidate, dict[str, Any]], None]) -> None:
    # NOTE: a local runner times after every build is done (builds would steal its cores); remote
    # devices time while later candidates still build here.
    ready: list[tuple[Candidate, Path]] = []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=_SPAWN) as builds, \
            cf.ThreadPoolExecutor(max_workers=runner.workers) as timers:
        built = {builds.submit(_build_candidate, spec, target, c.kernel, c.config,
                               _scratch(spec, target) / c.key): c for c in todo}
        timing = {}
        for future in cf.as_completed(built):
            cand = built[future]
            try:
                library = future.result()
            except Exception as err:  # failed build: infinite time, the run goes on
                record(cand, _failed(err))
                continue
            if runner.overlap:
                timing[timers.submit(_time, runner, spec, cand, library)] = cand
            else:
                ready.append((cand, library))
        for cand, library in ready:
            record(cand, _time(runner, spec, cand, library))
        for future in cf.as_completed(timing):
            record(timing[future], future.result())


@dataclass(frozen=True, slots=True)
class Candidate:
    """One config of one kernel to build and time on one workload; `key` names it in the log."""

    kernel: str
    config: dict[str, Any]
    workload: dict[str, Any]
    key: str
    default: bool


class Runner(Protocol):
    """Where candidates are timed. `overlap`: time while others build; `workers`: timings at once."""

    workers: int
    overlap: bool

    def device_info(self) -> dict[str, Any]: ...

    def measure(self, spec: AttentionSpec, cand: Candidate, library: Path) -> dict[str, Any]: ...


class LocalRunner:
    """Times candidates in this process on this host's CPU, one at a time; a candidate whose output
    disagrees with the float64 reference is a failed run (`check_output`)."""

    workers, overlap = 1, False

    def __init__(self) -> None:
        self._inputs: dict[str, tuple[str, tuple, Any]] = {}  # per kernel: workload, inputs, expected
        self._guards: dict = {}  # per guard step (time_guard)

    def device_info(self) -> dict[str, Any]:
        return {"kind": "cpu", "name": host_target_id()}

    def measure(self, spec: AttentionSpec, cand: Candidate, library: Path) -> dict[str, Any]:
        import tvm

        from pgen_runtime.kernels import PagedKernels

        module = tvm.runtime.load_module(str(library))
        kernels = PagedKernels(spec, {cand.kernel: module[cand.kernel]}, "cpu", {cand.kernel: cand.config})
        workload = json.dumps(cand.workload, sort_keys=True)
        if self._inputs.get(cand.kernel, ("",))[0] != workload:
            self._inputs[cand.kernel] = (workload, *make_checked_inputs(spec, cand.kernel, cand.workload, "cpu"))
        _, args, want = self._inputs[cand.kernel]
        times = time_kernel(kernels, cand.kernel, args)
        check_output(spec, args[-1], want)
        result = {"times_ms": times, "median_ms": statistics.median(times), "error": None}
        if cand.workload.get("guard"):
            result["guard_ms"] = time_guard(kernels, cand.kernel, cand.workload["guard"], "cpu", self._guards)
        return result


def _time(runner: Runner, spec: AttentionSpec, cand: Candidate, library: Path) -> dict[str, Any]:
    try:
        return runner.measure(spec, cand, library)
    except TuneError:  # the device is gone (no RPC session): stop; a rerun resumes from the log
        raise
    except Exception as err:  # failed run: infinite time, the run goes on
        return _failed(err)


def _failed(err: Exception) -> dict[str, Any]:
    return {"times_ms": [], "median_ms": None, "error": f"{type(err).__name__}: {err}"[:2000]}


def load_workload(path: str | Path) -> dict[str, Any]:
    """Read a workload file (JSON or TOML): per kernel `seq_lens` (and `new_tokens` for extend),
    optionally `lengths` (a length distribution, see `pgen.blocksize`).

    Raises:
        TuneError: unreadable file, unknown section, or lengths that no kernel can run.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as err:
        raise TuneError(f"workload file {path} is unreadable ({err}); write JSON or TOML") from None
    unknown = set(data) - {*TUNABLE, "lengths"}
    if unknown:
        raise TuneError(f"workload file {path} has sections {sorted(unknown)}; use decode, extend and lengths")
    for kernel in TUNABLE:
        if kernel in data:
            _check_workload(path, kernel, data[kernel])
    return data


def _check_workload(path: Path, kernel: str, w: Any) -> None:
    lens = w.get("seq_lens") if isinstance(w, dict) else None
    if not isinstance(lens, list) or not lens or not all(isinstance(n, int) and n >= 1 for n in lens):
        raise TuneError(f"workload file {path}: {kernel}.seq_lens must be a non-empty list of positive ints; "
                        f"got {lens!r}")
    guard = w.get("guard")
    if guard is not None:
        glens = guard.get("seq_lens") if isinstance(guard, dict) else None
        if kernel != "decode" or not isinstance(glens, list) or not glens or not all(
                isinstance(n, int) and n >= 1 for n in glens):
            raise TuneError(f"workload file {path}: {kernel}.guard must be a decode step, seq_lens a non-empty "
                            f"list of positive ints; got {guard!r}")
    if kernel == "extend":
        new = w.get("new_tokens")
        if not isinstance(new, list) or len(new) != len(lens) or not all(
                isinstance(n, int) and 1 <= n <= m for n, m in zip(new, lens)):
            raise TuneError(f"workload file {path}: extend.new_tokens must list 1..seq_lens[i] new tokens per "
                            f"sequence ({len(lens)} entries); got {new!r}")


def summary(path: Path) -> str:
    """Per kernel of a log: best vs default time and the best config."""
    lines = []
    for kernel, c in tuning_log.compare(tuning_log.load(path)).items():
        best, default = c["best"], c["default"]
        vs = f" vs default {c['default_ms']:.4f} ms (tuned/default {c['ratio']:.2f})" if default else ""
        how = "confirmed" if "confirm_ms" in best else "search"
        guard = ""
        if best.get("guard_ms") is not None:
            guard = f", guard step {best['guard_ms']:.4f} ms" + (
                f" vs default {default['guard_ms']:.4f}" if default and default.get("guard_ms") is not None else "")
        kept = ""
        if c["fastest_ms"] < c["best_ms"]:
            kept = (f" (default kept: the fastest, {c['fastest_ms']:.4f} ms, is within "
                    f"{round(100 * (tuning_log.DEFAULT_MARGIN - 1))}% of it)")
        lines.append(f"  {kernel:<7} best {c['best_ms']:.4f} ms{vs}{kept}, {how} times{guard} {json.dumps(best['config'], sort_keys=True)} "
                     f"[{c['measured']} measured, {c['failed']} failed]")
    return "\n".join(lines)


def parse_kernels(text: str) -> tuple[str, ...]:
    """`decode,extend` -> ("decode", "extend"); raises TuneError for a kernel without knobs."""
    kernels = tuple(k for k in text.replace(" ", "").split(",") if k)
    bad = [k for k in kernels if k not in TUNABLE]
    if bad or not kernels:
        raise TuneError(f"--kernels {text!r}: tunable kernels are {', '.join(TUNABLE)}")
    return kernels


def parse_ints(name: str, text: str) -> list[int]:
    """`8,16,32` -> [8, 16, 32]; raises TuneError naming `name`."""
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise TuneError(f"{name} {text!r} must be a comma list of integers, e.g. 8,16,32,64") from None


def emit_bundle(spec: AttentionSpec, target: str | BuildTarget, out: Path, kernels: tuple[str, ...] = TUNABLE,
                trials: int = 8, workloads: dict[str, dict] | None = None, jobs: int = 2,
                progress: Callable[[str], None] | None = None, refine_from: Path | None = None) -> Path:
    """Build every candidate into one folder that the device measures with only pgen_runtime.

    Args:
        refine_from: the device's tuning log. A kernel with records on its workload there gets, in
            place of the sample, the default and configs the log lacks one knob away from its
            fastest records (`_neighbourhood`, `trials` in all): the offline counterpart of
            `_refine`, one step per round trip (bundle, measure there, ingest).
    """
    from . import cuda

    target = parse_targets(target)[0] if isinstance(target, str) else target
    log = tuning_log.load(Path(refine_from), spec, target.kind) if refine_from is not None else None
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "lib" / "tvm").mkdir(parents=True)
    for lib in cuda.tvm_runtime_lib_paths(cuda=target.kind == "cuda"):
        shutil.copy2(lib, out / "lib" / "tvm" / lib.name)
    kind = "cuda" if target.kind == "cuda" else "cpu"
    workloads = {k: (workloads or {}).get(k) or default_workload(k, kind, spec) for k in kernels}
    refined = {k: _neighbourhood(spec, target, log, k, workloads[k], trials) if log else [] for k in kernels}
    todo = [(k, c) for k in kernels for c in refined[k] or candidates(spec, target, k, trials)]
    bar = _Progress(len(todo), progress, measured=False)
    entries = []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=_SPAWN) as pool:
        jobs_ = []
        for kernel, config in todo:
            key = candidate_key(kernel, config, workloads[kernel], target.kind)
            jobs_.append((kernel, config, key, pool.submit(_build_candidate, spec, target, kernel, config, out / "candidates" / key)))
        for kernel, config, key, future in jobs_:
            try:
                future.result()
                entries.append({"kernel": kernel, "config": config, "key": key,
                                "schedule": tuning_log.schedule_version(kernel, target.kind, config["rule"]),
                                "library": f"candidates/{key}/kernels.so"})
                bar.step({"kernel": kernel, "config": config, "median_ms": None})
            except Exception as err:  # recorded as failed at ingest time
                entries.append({"kernel": kernel, "config": config, "key": key, "library": None,
                                "schedule": tuning_log.schedule_version(kernel, target.kind, config["rule"]),
                                "build_error": f"{type(err).__name__}: {err}"})
                bar.step({"kernel": kernel, "config": config, "error": str(err)})
    meta = {"bundle_id": hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:12],
            "spec": spec.to_dict(), "target": target.name, "target_kind": target.kind, "versions": versions(),
            "workloads": workloads, "candidates": [e for e in entries if e["library"]],
            "build_failures": [e for e in entries if not e["library"]]}
    (out / BUNDLE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out


def _neighbourhood(spec: AttentionSpec, target: BuildTarget, log: dict[str, Any], kernel: str, workload: dict,
                   trials: int) -> list[dict]:
    """The default, then up to `trials` - 1 configs `log` has not measured on `workload`, one knob away
    from its fastest current records there (fastest first; failed ones and those outside the guard
    never count); [] where it has no such records.

    NOTE: the default comes along because the device that measures the bundle may not be the one
    whose log it refines (an H100 refining from the H200's): its log then still has the default to
    compare against. Where the log has it already, `ingest` keeps the first measurement."""
    recs = _records(tuning_log.current_records(log), kernel, workload)
    ok = _fastest_first(recs, log)
    if not ok:
        return []
    default = schedules.default_config(kernel, spec, target.info)
    out = [default]
    done = {r.get("key") for r in recs} | {candidate_key(kernel, default, workload, target.kind)}
    for rec in ok:
        fresh = _fresh_neighbours(spec, target, kernel, workload, rec["config"], done)[:max(0, trials - len(out))]
        done.update(key for _, key in fresh)
        out += [config for config, _ in fresh]
    return out


def ingest(results_file: Path, bundle: Path | None = None, log_root: Path | None = None) -> Path:
    """Merge a device's results file (and the bundle's build failures) into that device's tuning log,
    dropping its records of older schedule code."""
    try:
        results = json.loads(Path(results_file).read_text())
        spec = AttentionSpec.from_dict(results["spec"], source=str(results_file))
        device, kind = results["device"], results["target_kind"]
    except (OSError, ValueError, KeyError) as err:
        raise TuneError(f"results file {results_file} is unreadable or incomplete ({err}); run the measuring "
                        "script again") from None
    target_id = device_target_id(device)
    path = tuning_log.log_path(spec, target_id, log_root)
    target = BuildTarget(kind, archs=(device.get("arch", ""),) if kind == "cuda" else ())
    log = open_log(path, spec, target, device)
    # As local tuning does: records of older schedule code go (builds never use them).
    log["records"] = tuning_log.current_records(log)
    known = {r.get("key") for r in log["records"]}
    failures = []
    if bundle is not None:
        meta = json.loads((Path(bundle) / BUNDLE).read_text())
        failures = [{**f, "times_ms": [], "median_ms": None, "error": f["build_error"]} for f in meta["build_failures"]]
    for rec in results["results"] + failures:
        if rec["key"] not in known:
            log["records"].append({k: rec.get(k) for k in ("kernel", "config", "workload", "key", "schedule",
                                                          "times_ms", "median_ms", "error", "guard_ms")
                                   if k != "guard_ms" or rec.get(k) is not None})
    tuning_log.save(path, log)
    return path


def device_target_id(device: dict[str, Any]) -> str:
    """tuning_logs/ folder of a device: `cuda-sm_90-nvidia-h200`, or the CPU's id."""
    if device.get("kind") == "cuda":
        name = "".join(c if c.isalnum() else "-" for c in device["name"].lower()).strip("-")
        return f"cuda-{device['arch']}-{name}"
    return host_target_id()


def _build_candidate(spec, target, kernel, config, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    # Build beside and rename: a process may still map the previous library at this path.
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        compile_functions(spec, target, {kernel: config}, Path(tmp))
        for file in Path(tmp).iterdir():
            os.replace(file, out / file.name)
    return out / "kernels.so"


def open_log(path: Path, spec: AttentionSpec, target: BuildTarget, device: dict) -> dict[str, Any]:
    """The checked log at `path`, or a new empty one for `device`."""
    if path.is_file():
        return tuning_log.load(path, spec, target.kind)
    return {"format": tuning_log.FORMAT, "target_id": path.parent.name, "target_kind": target.kind,
            "device": device, "spec": spec.to_dict(), "spec_uri": spec.uri, "versions": versions(),
            "date": datetime.date.today().isoformat(), "records": []}


def _scratch(spec: AttentionSpec, target: BuildTarget) -> Path:
    """Candidate libraries of one spec and target. NOTE: one path per library: a process that
    loads a path twice gets the first library back (dlopen caches by path)."""
    from .build import cache_root

    return cache_root().parent / "tune" / spec.uri / target.name.replace(":", "-").replace(",", "-")


class _Progress:
    """One line per candidate: done/total, ETA and the best time so far per kernel."""

    def __init__(self, total: int, sink: Callable[[str], None] | None, measured: bool = True) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.sink = sink or (lambda line: print(line, file=sys.stderr, flush=True))
        self.best: dict[str, float] = {}
        self.measured = measured

    def step(self, record: dict[str, Any]) -> None:
        self.done += 1
        t = record.get("median_ms")
        if t is not None:
            self.best[record["kernel"]] = min(t, self.best.get(record["kernel"], float("inf")))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        best = " ".join(f"{k}={v:.3f}ms" for k, v in sorted(self.best.items()))
        status = f"{t:.3f} ms" if t is not None else ("built" if not self.measured and not record.get("error") else "failed")
        self.sink(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} ETA {eta:5.0f}s "
                  f"{record['kernel']} {json.dumps(record['config'], sort_keys=True)} -> {status}"
                  + (f" | best {best}" if best else ""))
