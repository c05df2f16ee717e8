"""Tuning logs: `tuning_logs/<target-id>/<spec-uri>.json`, their checks, and the best config per kernel.

A log is a reviewable JSON file: format version, target id and device, spec, versions, date, and one
record per measured candidate (kernel, knobs, workload, times). A log that is corrupt, or made for
another spec or target, raises `TuneError`; it is never used silently. A log may also hold a
`block_size_study` (see `pgen.blocksize`).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from pgen_runtime.errors import TuneError
from pgen_runtime.spec import AttentionSpec

from . import schedules

FORMAT = 1
# A list json.dumps spread over lines (raw newlines: never inside a JSON string) holding numbers only.
_NUMBER_LIST = re.compile(r"\[\n\s*([-+0-9.eE,\s]+?)\n\s*\]")
# A config slower than the default by more than this on its workload's guard step (see
# pgen_runtime.measure.GPU_DECODE_GUARD) is never the tuned one, however fast on the tuning batch.
GUARD_SLOWDOWN = 1.25
# The default config stays unless a tuned one is faster by more than this factor on the tuning
# step: the defaults are chosen for every shape (one long sequence, small batches), and a win of a
# percent or two on one step is within what the machines here vary by. On the H200, 2 warps per
# block with prefetch beat the default (4 warps) by 1.3% on 32 x 4096 fp16 Llama-3-8B decode and
# took 1.10x its time on the one-sequence guard step.
DEFAULT_MARGIN = 1.03


def logs_root() -> Path:
    """$PGEN_TUNING_LOGS, else the repository's tuning_logs/."""
    env = os.environ.get("PGEN_TUNING_LOGS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "tuning_logs"


def log_path(spec: AttentionSpec, target_id: str, root: Path | None = None) -> Path:
    return (root or logs_root()) / target_id / f"{spec.uri}.json"


def load(path: Path, spec: AttentionSpec | None = None, target_kind: str | None = None) -> dict[str, Any]:
    """Read and check a log.

    Raises:
        TuneError: not JSON, wrong format version, missing fields, another spec or target kind,
            or a record of the current schedule code whose knobs the rule does not know.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise TuneError(f"tuning log {path} is unreadable or not JSON ({err}); delete it or re-run pgen tune") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TuneError(f"tuning log {path} has format {data.get('format') if isinstance(data, dict) else None!r}, "
                        f"expected {FORMAT}; re-run pgen tune")
    for key in ("target_id", "target_kind", "spec", "records"):
        if key not in data:
            raise TuneError(f"tuning log {path} lacks {key!r}; it is truncated or hand-edited. Re-run pgen tune")
    logged = AttentionSpec.from_dict(data["spec"], source=f"tuning log {path}")
    if spec is not None and logged != spec:
        raise TuneError(f"tuning log {path} is for spec {logged.uri}, not {spec.uri}; tune this spec instead")
    if target_kind is not None and data["target_kind"] != target_kind:
        raise TuneError(f"tuning log {path} is for target kind {data['target_kind']}, not {target_kind}")
    if not isinstance(data["records"], list):
        raise TuneError(f"tuning log {path}: 'records' must be a list; re-run pgen tune")
    for rec in data["records"]:
        _check_record(path, rec, logged, data["target_kind"])
    return data


def save(path: Path, data: dict[str, Any]) -> None:
    """Write a log atomically (a reader never sees half a file), stamped with today's date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data["date"] = datetime.date.today().isoformat()
    tmp = path.with_suffix(".json.tmp")
    # Lists of numbers (workloads' lengths, search times) on one line each: one element per line
    # made a log of 24 records 3k lines long.
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
                            json.dumps(data, indent=1, sort_keys=True))
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _check_record(path: Path, rec: Any, spec: AttentionSpec, target_kind: str) -> None:
    if not isinstance(rec, dict) or {"kernel", "config", "median_ms"} - rec.keys() or not isinstance(rec["config"], dict):
        raise TuneError(f"tuning log {path} has a malformed record {str(rec)[:120]}; re-run pgen tune")
    for field in ("median_ms", "confirm_ms"):
        t = rec.get(field)
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf):
            raise TuneError(f"tuning log {path}: {rec['kernel']} record has {field}={t!r}; expected a positive "
                            "number or null (failed). Re-run pgen tune")
    if rec["kernel"] not in schedules.RULES:
        raise TuneError(f"tuning log {path} has a record for unknown kernel {rec['kernel']!r}; re-run pgen tune")
    if not current(rec, target_kind):
        # A measurement of older schedule code is never used; its knobs may have changed since.
        return
    rule = schedules.rule_named(rec["kernel"], target_kind, rec["config"]["rule"])
    knobs = {k.name: k for k in rule.knobs(spec, _info(target_kind))}
    unknown = sorted(set(rec["config"]) - knobs.keys() - {"rule"})
    if unknown:
        raise TuneError(f"tuning log {path}: {rec['kernel']} record has knobs {unknown} that rule "
                        f"{rule.name} does not have; re-run pgen tune")
    for name, value in rec["config"].items():
        if name != "rule" and value not in knobs[name].choices:
            raise TuneError(f"tuning log {path}: {rec['kernel']} knob {name}={value!r} is not one of "
                            f"{list(knobs[name].choices)}; re-run pgen tune")


def schedule_version(kernel: str, target_kind: str, rule: str) -> str:
    """A hash of the code that generates `kernel` with variant `rule` for `target_kind`: the rule's
    module and every schedule module it draws on. Records carry it, so a measurement of code that
    has since changed is never taken for the current code's.

    Raises:
        KeyError: `rule` is not a variant of `kernel` on `target_kind`.
    """
    return _schedule_version(kernel, target_kind, rule)


@functools.cache
def _schedule_version(kernel: str, target_kind: str, rule: str) -> str:
    found = schedules.rule_named(kernel, target_kind, rule)
    h = hashlib.sha256()
    for path in sorted(_module_files(type(found).__module__)):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _module_files(module: str) -> set[Path]:
    """The files of `module` and of every `pgen.schedules` module it uses, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for value in vars(sys.modules[name]).values():
            used = value.__name__ if isinstance(value, type(sys)) else getattr(value, "__module__", None)
            if isinstance(used, str) and used.startswith(schedules.__name__ + ".") and used not in seen:
                todo.append(used)
    return {Path(sys.modules[name].__file__) for name in seen}


def current(rec: dict[str, Any], target_kind: str) -> bool:
    """Whether a record measured the code that builds its variant now."""
    rule = rec["config"].get("rule") if isinstance(rec.get("config"), dict) else None
    if rule not in {r.name for r in schedules.rules_for(rec["kernel"], target_kind)}:
        return False
    return rec.get("schedule") == schedule_version(rec["kernel"], target_kind, rule)


def current_records(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The log's records that measured the code that builds their kernel now."""
    return [r for r in data["records"] if current(r, data["target_kind"])]


def best(data: dict[str, Any], margin: float = DEFAULT_MARGIN) -> dict[str, tuple[dict[str, Any], float]]:
    """Per kernel, the fastest config and its time (`time_of`), or the default's where it is within
    `margin` of that (1.0: the fastest); failed candidates are inf."""
    return _choose(data, margin)[0]


def _choose(data: dict[str, Any], margin: float) -> tuple[dict[str, tuple[dict[str, Any], float]], dict[str, float]]:
    """`best`'s choice per kernel, and the fastest time per kernel (what the margin compared against).

    Only records of the current schedule code count (`current`), and of the workload the kernel was
    last tuned on: times of different workloads do not compare. Where a kernel's finalists were
    confirmed (re-timed together after the search), only they compete, on their confirmed times:
    a search time that was low by chance does not win.
    """
    out: dict[str, tuple[dict[str, Any], float]] = {}
    records = current_records(data)
    latest = {r["kernel"]: r.get("workload") for r in records}
    records = within_guard([r for r in records if r.get("workload") == latest[r["kernel"]]], data)
    confirmed = {r["kernel"] for r in records if r.get("confirm_ms") is not None}
    default: dict[str, tuple[dict[str, Any], float]] = {}
    for rec in records:
        t = time_of(rec)
        if t is None or rec.get("error") or (rec["kernel"] in confirmed and rec.get("confirm_ms") is None):
            continue
        if rec["kernel"] not in out or t < out[rec["kernel"]][1]:
            out[rec["kernel"]] = (rec["config"], t)
        if is_default(data, rec) and (rec["kernel"] not in default or t < default[rec["kernel"]][1]):
            default[rec["kernel"]] = (rec["config"], t)
    fastest = {kernel: t for kernel, (_, t) in out.items()}
    for kernel, (config, t) in default.items():
        if t <= fastest[kernel] * margin:
            out[kernel] = (config, t)
    return out, fastest


def within_guard(records: list[dict[str, Any]], data: dict[str, Any]) -> list[dict[str, Any]]:
    """The records whose guard time (`guard_ms`, on their workload's `guard` step) is within
    GUARD_SLOWDOWN of the default config's on the same workload; records without one all pass, as do
    all where the default has none."""
    def step(r):
        return r["kernel"], json.dumps(r.get("workload"), sort_keys=True)

    limit = {step(r): r["guard_ms"] * GUARD_SLOWDOWN for r in records
             if r.get("guard_ms") is not None and not r.get("error") and is_default(data, r)}
    return [r for r in records if r.get("guard_ms") is None or r["guard_ms"] <= limit.get(step(r), math.inf)]


def time_of(rec: dict[str, Any]) -> float | None:
    """A record's time: the confirmed one where it has one, else its search median (None: failed)."""
    return rec["confirm_ms"] if rec.get("confirm_ms") is not None else rec["median_ms"]


def best_configs(spec: AttentionSpec, target) -> tuple[dict[str, tuple[dict[str, Any], str]], list[str]]:
    """Per kernel, (config, "tuned:<log folder>") from this target's log; and the kernels whose
    records all measured older schedule code (stale: they build with the default until re-tuned)."""
    path = find_log(spec, target)
    if path is None:
        return {}, []
    data = load(path, spec, target.kind)
    tuned = {k: (cfg, f"tuned:{path.parent.name}") for k, (cfg, _) in best(data).items()}
    stale = sorted({r["kernel"] for r in data["records"]} - set(tuned))
    return tuned, stale


def find_log(spec: AttentionSpec, target) -> Path | None:
    """The log for this spec on this target: for llvm the host CPU's, else its ISA class's
    (`cpu-x86-avx2`); for CUDA, a log of the newest arch."""
    root = logs_root()
    if target.kind == "llvm":
        from .target import host_target_ids

        return next((p for i in host_target_ids() if (p := log_path(spec, i, root)).is_file()), None)
    arch = target.archs[-1]
    found = sorted(root.glob(f"cuda-{arch}-*/{spec.uri}.json"))
    return found[0] if found else None


def _info(kind: str):
    """The target a record's knobs are checked against: this host's CPU (its vector width decides
    knobs such as qk_key_group), or a CUDA arch."""
    from .target import BuildTarget, host_cpu_name

    return (BuildTarget("llvm", mcpu=host_cpu_name()) if kind == "llvm" else BuildTarget("cuda", ("sm_90",))).info


def compare(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per kernel: the best record, the default's record on the same workload (or None), their ratio;
    records of older schedule code are left out."""
    out = {}
    records = current_records(data)
    chosen, fastest = _choose(data, DEFAULT_MARGIN)
    for kernel, (config, t) in chosen.items():
        best_rec = next(r for r in records if r["kernel"] == kernel and r["config"] == config
                        and time_of(r) == t)
        default = next((r for r in records if r["kernel"] == kernel and is_default(data, r)
                        and r.get("workload") == best_rec.get("workload") and time_of(r) is not None
                        and ("confirm_ms" in r) == ("confirm_ms" in best_rec)), None)
        out[kernel] = {"best": best_rec, "default": default, "best_ms": t, "fastest_ms": fastest[kernel],
                       "default_ms": time_of(default) if default else None,
                       "ratio": t / time_of(default) if default else None,
                       "measured": sum(r["kernel"] == kernel for r in records),
                       "failed": sum(r["kernel"] == kernel and r["median_ms"] is None for r in records)}
    return out


def is_default(data: dict[str, Any], rec: dict[str, Any]) -> bool:
    """Whether a record holds its rule's default config (logs before the `default` flag: recomputed)."""
    if "default" in rec:
        return bool(rec["default"])
    from .target import BuildTarget, host_cpu_name

    kind = data["target_kind"]
    target = BuildTarget(kind, archs=(data["device"].get("arch", "sm_80"),)) if kind == "cuda" else \
        BuildTarget(kind, mcpu=host_cpu_name())
    spec = AttentionSpec.from_dict(data["spec"])
    return rec["config"] == schedules.default_config(rec["kernel"], spec, target.info)
