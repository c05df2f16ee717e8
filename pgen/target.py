"""Build targets: parse `llvm` / `cuda:sm_80,sm_90`, and name the device a tuning log belongs to."""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass

from pgen_runtime.errors import BuildError
from pgen_runtime.target import REQUIRED_BY_MCPU, host_cpu_features, isa_class

from pgen.schedules.base import TargetInfo

_ARCH = re.compile(r"sm_(\d+)a?")
# Per-block limits of the CUDA archs pgen builds for (same on sm_80 and sm_90 without opt-in).
_CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 48 * 1024}
# LLVM's names of the SIMD extensions a CPU build's code depends on, with /proc/cpuinfo's names.
_SIMD_FLAGS = {"avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
               "movbe": "movbe", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
               "avx512dq": "avx512dq", "avx512cd": "avx512cd", "avx512bf16": "avx512_bf16",
               "avx512fp16": "avx512_fp16", "avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi",
               "avx512vbmi2": "avx512_vbmi2", "avx512ifma": "avx512ifma", "avx512bitalg": "avx512_bitalg",
               "avx512vpopcntdq": "avx512_vpopcntdq", "gfni": "gfni", "vaes": "vaes",
               "vpclmulqdq": "vpclmulqdq"}
# x86-64 levels, widest first: what a build targets when the host lacks a feature of its CPU model.
_X86_LEVELS = ("x86-64-v4", "x86-64-v3", "x86-64-v2")


@dataclass(frozen=True, slots=True)
class BuildTarget:
    """One library to build: `llvm` for this host's CPU, or CUDA for one or more archs.

    `bounds_checks` builds every buffer access with a check that raises (naming the function, the
    buffer and the index) instead of reading or writing out of bounds: for tests and debugging.
    """

    kind: str
    archs: tuple[str, ...] = ()
    mcpu: str = ""
    bounds_checks: bool = False

    @property
    def name(self) -> str:
        """`llvm` or `cuda:sm_80,sm_90`, as the CLI spells it."""
        return "llvm" if self.kind == "llvm" else "cuda:" + ",".join(self.archs)

    @property
    def info(self) -> TargetInfo:
        if self.kind == "llvm":
            features = frozenset(host_cpu_features())
            return TargetInfo("llvm", self.mcpu, vector_bits=512 if "avx512f" in features else 256, features=features)
        return TargetInfo("cuda", self.archs[0], **_CUDA_LIMITS)

    @property
    def tir_pipeline(self) -> str:
        """The TIR pipeline `tvm.compile` lowers this target's code with."""
        if not self.bounds_checks:
            return "default"
        from . import bounds

        return bounds.PIPELINE

    def tvm_target(self) -> dict:
        if self.kind == "llvm":
            return {"kind": "llvm", "mcpu": self.mcpu}
        return {"kind": "cuda", "arch": self.archs[0]}


def parse_targets(text: str) -> list[BuildTarget]:
    """Parse `llvm`, `cuda:sm_80,sm_90` or a comma list of both (`llvm,cuda:sm_80,sm_90`).

    Raises:
        BuildError: an unknown target kind or a malformed arch.
    """
    targets: list[BuildTarget] = []
    archs: list[str] = []
    for raw in text.replace(" ", "").split(","):
        item = raw
        if item.startswith("cuda:"):
            item = item[5:]
            archs.append(item)
            continue
        if item == "cuda":
            raise BuildError("target 'cuda' needs archs: use cuda:sm_80,sm_90 (one entry per GPU arch)")
        if _ARCH.fullmatch(item) and archs:
            archs.append(item)
            continue
        if item == "llvm":
            targets.append(BuildTarget("llvm", mcpu=host_cpu_name()))
            continue
        raise BuildError(f"target {raw!r} is not known; use llvm, cuda:sm_80 or cuda:sm_80,sm_90")
    for arch in archs:
        if not _ARCH.fullmatch(arch):
            raise BuildError(f"CUDA arch {arch!r} is malformed; use names like sm_80 or sm_90")
    if archs:
        order = sorted(set(archs), key=lambda a: int(_ARCH.fullmatch(a).group(1)))
        targets.append(BuildTarget("cuda", archs=tuple(order)))
    if not targets:
        raise BuildError("no target given; use llvm or cuda:sm_80,sm_90")
    return targets


@functools.cache
def host_cpu_name() -> str:
    """LLVM's name for this CPU (e.g. znver5), the `mcpu` a CPU build is tuned for.

    NOTE: LLVM names the CPU by its model number, but a VM may mask extensions of that model (a
    Zen 4 guest without AVX-512): code built for the model then dies on its first AVX-512
    instruction. Where the host lacks an extension the model implies, the build targets the widest
    x86-64 level (x86-64-v4/v3/v2) whose extensions it has.
    """
    from tvm.target import codegen

    cpu = str(codegen.llvm_get_system_cpu())
    if platform.machine() != "x86_64" or not cpu_features(cpu, missing=True):
        return cpu
    have = host_cpu_features()
    return next((level for level in _X86_LEVELS if all(f in have for f in REQUIRED_BY_MCPU[level])), "x86-64")


def cpu_features(mcpu: str, missing: bool = False) -> list[str]:
    """The SIMD extensions (cpuinfo names) LLVM may use when it builds for `mcpu` on this machine,
    a manifest's `cpu_features`; with `missing`, only those this host lacks."""
    import tvm
    from tvm.target import codegen

    used = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    flags = sorted(flag for name, flag in _SIMD_FLAGS.items() if name in used)
    return [f for f in flags if f not in host_cpu_features()] if missing else flags


def host_target_ids() -> list[str]:
    """The ids of this CPU in tuning_logs/, most specific first: LLVM CPU name and machine
    (`cpu-znver5-x86_64`), then the ISA class (`cpu-x86-avx2`), which any host of that class reuses."""
    return [host_target_id(), f"cpu-{isa_class()}"]


def host_target_id() -> str:
    """The id of this CPU in tuning_logs/ that its own tuning writes: e.g. `cpu-znver5-x86_64`."""
    return f"cpu-{host_cpu_name()}-{platform.machine()}"
