"""Facts about the serving host that decide whether a package's library can run here."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")
_AVX2 = ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe")
# ISA extensions an LLVM CPU build may use, by the name /proc/cpuinfo gives them: the x86-64
# levels pgen builds for when the host lacks what its CPU model implies (a VM that masks AVX-512),
# and named CPUs. A manifest's `cpu_features` (written at build time) takes precedence.
REQUIRED_BY_MCPU = {
    "x86-64-v4": (*_AVX512, *_AVX2),
    "x86-64-v3": _AVX2,
    "x86-64-v2": ("sse4_2", "popcnt"),
    "znver4": (*_AVX512, *_AVX2),
    "znver5": (*_AVX512, *_AVX2),
    "sapphirerapids": (*_AVX512, *_AVX2),
    "skylake-avx512": (*_AVX512, *_AVX2),
    "icelake-server": (*_AVX512, *_AVX2),
    "znver3": _AVX2,
    "znver2": _AVX2,
    "haswell": _AVX2,
    "skylake": _AVX2,
    "alderlake": _AVX2,
}


@functools.cache
def host_cpu_features() -> frozenset[str]:
    """CPU flags of this host (empty where /proc/cpuinfo is unavailable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isa_class(features: frozenset[str] | None = None, machine: str | None = None) -> str:
    """The host's ISA class, the fallback key of CPU tuning logs: `x86-avx512`, `x86-avx2`,
    `x86-64`, or the machine name elsewhere (`aarch64`)."""
    machine = machine or platform.machine()
    have = host_cpu_features() if features is None else features
    if machine not in ("x86_64", "AMD64"):
        return machine
    if all(f in have for f in (*_AVX512, *_AVX2)):
        return "x86-avx512"
    if all(f in have for f in _AVX2):
        return "x86-avx2"
    return "x86-64"


def missing_cpu_features(mcpu: str, machine: str, required: list[str] | None = None) -> list[str]:
    """What this host lacks to run a library built for `mcpu` on `machine` (empty: it can).

    Args:
        required: the build's own list (a manifest's `cpu_features`); else the table's for `mcpu`.
    """
    if machine != platform.machine():
        return [f"machine {machine} (this host is {platform.machine()})"]
    required = required if required is not None else REQUIRED_BY_MCPU.get(mcpu, ())
    have = host_cpu_features()
    return [flag for flag in required if flag not in have]
