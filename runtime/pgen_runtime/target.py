"""Facts about the serving host that decide whether a package's library can run here."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# ISA extensions an LLVM CPU build may use, by the name /proc/cpuinfo gives them.
REQUIRED_BY_MCPU = {
    "znver4": ("avx512f", "avx512bw", "avx512vl", "f16c", "fma"),
    "znver5": ("avx512f", "avx512bw", "avx512vl", "f16c", "fma"),
    "sapphirerapids": ("avx512f", "avx512bw", "avx512vl", "f16c", "fma"),
    "skylake-avx512": ("avx512f", "avx512bw", "avx512vl", "f16c", "fma"),
    "icelake-server": ("avx512f", "avx512bw", "avx512vl", "f16c", "fma"),
    "znver3": ("avx2", "f16c", "fma"),
    "znver2": ("avx2", "f16c", "fma"),
    "haswell": ("avx2", "f16c", "fma"),
    "skylake": ("avx2", "f16c", "fma"),
    "alderlake": ("avx2", "f16c", "fma"),
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


def missing_cpu_features(mcpu: str, machine: str) -> list[str]:
    """What this host lacks to run a library built for `mcpu` on `machine` (empty: it can)."""
    if machine != platform.machine():
        return [f"machine {machine} (this host is {platform.machine()})"]
    required = REQUIRED_BY_MCPU.get(mcpu, ())
    have = host_cpu_features()
    return [flag for flag in required if flag not in have]
