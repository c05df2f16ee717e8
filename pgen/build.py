"""Build: spec + target -> one kernel library, cached on disk, and `build_kernels` for in-process use.

Cache key: spec, target, every kernel's schedule config, and the versions of pgen, TVM and the
generator sources. A build goes try cached load -> lock -> check again -> build in a temporary
folder -> atomic rename (FlashInfer's JIT discipline), so concurrent builds never see half a library.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

import pgen
from pgen_runtime import kernel_table
from pgen_runtime.errors import BuildError
from pgen_runtime.kernel_table import KERNEL_NAMES
from pgen_runtime.kernels import PagedKernels
from pgen_runtime.spec import AttentionSpec

from . import lower, schedules, tuning_log
from .target import BuildTarget, parse_targets

LIBRARY = "kernels.so"
# The generator code: a change to any of it changes the cache key (cuda.py holds the nvcc flags).
_SOURCES = [Path(lower.__file__), Path(lower.__file__).with_name("cuda.py"), Path(kernel_table.__file__),
            *sorted(Path(schedules.__file__).parent.glob("*.py"))]


def cache_root() -> Path:
    """Where built libraries are cached: $PGEN_CACHE_DIR, else ~/.cache/pgen/kernels."""
    return Path(os.environ.get("PGEN_CACHE_DIR", Path.home() / ".cache" / "pgen")) / "kernels"


@dataclass(slots=True)
class KernelChoice:
    """The schedule one kernel was built with, and where it came from."""

    config: dict[str, Any]
    source: str  # "default" or "tuned:<log path>"
    rule: str


@dataclass(slots=True)
class BuiltLibrary:
    """One compiled library: its path, what it holds, and how it was made."""

    spec: AttentionSpec
    target: BuildTarget
    path: Path
    key: str
    choices: dict[str, KernelChoice]
    signatures: dict[str, list[dict[str, Any]]]
    cached: bool
    seconds: float
    sass: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per kernel: the schedule and its provenance (and SASS resources on CUDA)."""
        lines = [f"{self.target.name}: {self.path} ({'cached' if self.cached else f'built in {self.seconds:.1f}s'})"]
        for name, choice in self.choices.items():
            lines.append(f"  {name:<12} {choice.source:<10} {json.dumps(choice.config, sort_keys=True)}")
        for arch, kernels in sorted(self.sass.items()):
            for k in kernels:
                lines.append(f"  {arch} {k['name']:<32} regs={k['registers']:<4} smem={k['shared_bytes']:<6} "
                             f"local={k['local_bytes']} spill_st={k['local_stores']} spill_ld={k['local_loads']}")
        return "\n".join(lines)


def choose_configs(spec: AttentionSpec, target: BuildTarget,
                   overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, KernelChoice]:
    """Per kernel: an explicit override, else the best tuning record for this target, else the
    default variant's default config.

    An override sets knobs of the default variant, or of the variant it names ("rule"); one that
    names a variant of another target kind (a CUDA rule in an llvm + CUDA package) leaves this
    target's choice alone.
    """
    overrides = {name: o for name, o in (overrides or {}).items()
                 if "rule" not in o or o["rule"] in {r.name for r in schedules.rules_for(name, target.kind)}}
    tuned, stale = tuning_log.best_configs(spec, target)
    info = target.info
    choices = {}
    for name in KERNEL_NAMES:
        if name in overrides:
            config, source = _overridden(name, spec, target, overrides[name]), "override"
        elif name in tuned:
            config, source = tuned[name]
        else:
            config = schedules.default_config(name, spec, info)
            source = "default:stale-log" if name in stale else "default"
        reason = schedules.check(name, spec, info, config)
        if reason:
            raise BuildError(f"{name} config {config} ({source}) cannot run on {target.name}: {reason}")
        choices[name] = KernelChoice(config=config, source=source, rule=config["rule"])
    return choices


def _overridden(name: str, spec: AttentionSpec, target: BuildTarget, override: dict[str, Any]) -> dict[str, Any]:
    """`override` on the defaults of the variant it names, else of the default variant."""
    try:
        rule = schedules.rule_for(name, spec, target.info, override)
    except KeyError as err:
        raise BuildError(f"override of {name}: {err.args[0]}") from None
    knobs = {k.name for k in rule.knobs(spec, target.info)}
    unknown = sorted(set(override) - knobs - {"rule"})
    if unknown:
        others = [r.name for r in schedules.rules_for(name, target.kind)
                  if set(unknown) <= {k.name for k in r.knobs(spec, target.info)}]
        fix = f"name the variant: rule={others[0]}" if others else f"its knobs are {sorted(knobs)}"
        raise BuildError(f"override of {name}: {unknown} are not knobs of {rule.name}; {fix}")
    return {**rule.default(spec, target.info), **override}


def build_library(spec: AttentionSpec, target: BuildTarget | str = "llvm",
                  overrides: dict[str, dict[str, Any]] | None = None) -> BuiltLibrary:
    """Build (or reuse from the cache) the six kernels of `spec` for one target.

    Raises:
        BuildError: lowering, scheduling or compiling failed; the message names the kernel.
    """
    if isinstance(target, str):
        (target,) = parse_targets(target)
    choices = choose_configs(spec, target, overrides)
    key = _cache_key(spec, target, choices)
    folder = cache_root() / f"{spec.uri}-{target.name.replace(':', '-').replace(',', '-')}-{key}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        return _from_meta(spec, target, folder, key, choices, cached=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if meta_path.is_file():
            return _from_meta(spec, target, folder, key, choices, cached=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            meta = _compile(spec, target, choices, tmp)
            meta["seconds"] = time.perf_counter() - start
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _from_meta(spec, target, folder, key, choices, cached=False)


def build_kernels(spec: AttentionSpec, target: str = "llvm", device: str | None = None,
                  overrides: dict[str, dict[str, Any]] | None = None) -> PagedKernels:
    """Build (or reuse) the kernels of `spec` and load them in this process.

    Returns:
        `PagedKernels` with decode, extend, cache_write, copy_blocks, swap_out and swap_in.
    """
    lib = build_library(spec, target, overrides)
    module = tvm.runtime.load_module(str(lib.path))
    device = device or ("cpu" if lib.target.kind == "llvm" else "cuda:0")
    functions = {name: module[name] for name in KERNEL_NAMES}
    return PagedKernels(spec, functions, device, {n: c.config for n, c in lib.choices.items()})


def _compile(spec: AttentionSpec, target: BuildTarget, choices: dict[str, KernelChoice], out: Path) -> dict:
    signatures, sass = compile_functions(spec, target, {n: c.config for n, c in choices.items()}, out)
    return {
        "spec": spec.to_dict(),
        "target": target.name,
        "mcpu": target.mcpu,
        "choices": {n: {"config": c.config, "source": c.source, "rule": c.rule} for n, c in choices.items()},
        "signatures": signatures,
        "sass": sass,
        "versions": versions(),
    }


def compile_functions(spec: AttentionSpec, target: BuildTarget, configs: dict[str, dict[str, Any]],
                      out: Path) -> tuple[dict[str, list], dict[str, list]]:
    """Schedule the named kernels with `configs` and compile them into `out`/kernels.so.

    Returns:
        (argument signatures per kernel, SASS resources per arch: empty for llvm).
    """
    funcs = lower.lower(spec, target.info, configs)
    mod = tvm.IRModule(funcs)
    signatures = {name: _signature(func) for name, func in funcs.items()}
    sass: dict[str, list[dict[str, Any]]] = {}
    try:
        if target.kind == "llvm":
            executable = tvm.compile(mod, target=tvm.target.Target(target.tvm_target()),
                                     tir_pipeline=target.tir_pipeline)
        else:
            from . import cuda

            executable, cubins = cuda.build_cuda(mod, target.archs)
            for arch, cubin in sorted(cubins.items()):
                (out / f"kernels.{arch}.cubin").write_bytes(cubin)
                for res in cuda.sass_report(cubin).get(arch, []):
                    sass.setdefault(arch, []).append(
                        {k: getattr(res, k) for k in ("name", "registers", "shared_bytes", "local_bytes",
                                                      "stack_bytes", "local_stores", "local_loads")})
            missing = [a for a in target.archs if a not in sass]
            if missing:
                raise BuildError(f"no SASS for {missing} in the CUDA build of {spec.uri}")
        executable.export_library(str(out / LIBRARY))
    except BuildError:
        raise
    except Exception as err:  # TVM raises TVMError/RuntimeError/ValueError alike
        raise BuildError(f"compiling {spec.uri} for {target.name} failed: {err}") from err
    return signatures, sass


def _from_meta(spec, target, folder: Path, key: str, choices, cached: bool) -> BuiltLibrary:
    meta = json.loads((folder / "meta.json").read_text())
    return BuiltLibrary(spec=spec, target=target, path=folder / LIBRARY, key=key, choices=choices,
                        signatures=meta["signatures"], cached=cached, seconds=meta["seconds"], sass=meta["sass"])


def _signature(func) -> list[dict[str, Any]]:
    args = []
    for param in func.params:
        if isinstance(param.ty, tvm.tirx.buffer.BufferType):  # TVM 0.27: buffer params are buffers
            shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in param.shape]
            args.append({"name": param.name, "dtype": str(param.dtype), "shape": shape})
        else:
            args.append({"name": param.name, "dtype": str(param.ty.dtype), "shape": []})
    return args


def versions() -> dict[str, str]:
    import tvm_ffi

    return {"pgen": pgen.__version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}


def _cache_key(spec: AttentionSpec, target: BuildTarget, choices: dict[str, KernelChoice]) -> str:
    h = hashlib.sha256()
    h.update(spec.digest().encode())
    h.update(json.dumps([target.name, target.mcpu, target.bounds_checks, versions()]).encode())
    h.update(json.dumps({n: c.config for n, c in choices.items()}, sort_keys=True).encode())
    for path in _SOURCES:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
