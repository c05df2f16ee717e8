"""Build targets: parse `llvm` / `cuda:sm_80,sm_90`, and name the device a tuning log belongs to."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

from pgen_runtime.errors import BuildError
from pgen_runtime.target import host_cpu_features

from pgen.schedules.base import TargetInfo

_ARCH = re.compile(r"sm_(\d+)a?")
# Per-block limits of the CUDA archs pgen builds for (same on sm_80 and sm_90 without opt-in).
_CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 48 * 1024}


@dataclass(frozen=True, slots=True)
class BuildTarget:
    """One library to build: `llvm` for this host's CPU, or CUDA for one or more archs."""

    kind: str
    archs: tuple[str, ...] = ()
    mcpu: str = ""

    @property
    def name(self) -> str:
        """`llvm` or `cuda:sm_80,sm_90`, as the CLI spells it."""
        return "llvm" if self.kind == "llvm" else "cuda:" + ",".join(self.archs)

    @property
    def info(self) -> TargetInfo:
        if self.kind == "llvm":
            wide = "avx512f" in host_cpu_features()
            return TargetInfo("llvm", self.mcpu, vector_bits=512 if wide else 256)
        return TargetInfo("cuda", self.archs[0], **_CUDA_LIMITS)

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


def host_cpu_name() -> str:
    """LLVM's name for this CPU (e.g. znver5), the `mcpu` a CPU build is tuned for."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def host_target_id() -> str:
    """The id of this CPU in tuning_logs/: LLVM CPU name and ISA, e.g. `cpu-znver5-x86_64`."""
    return f"cpu-{host_cpu_name()}-{platform.machine()}"
