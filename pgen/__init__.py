"""pgen: paged-attention kernels lowered from a spec through Apache TVM.

The compiler side. The spec and the error hierarchy are shared with the runtime (`pgen_runtime`),
which a serving host installs without TVM.
"""

from __future__ import annotations

from pgen_runtime.errors import (
    BuildError,
    ModelImportError,
    OutOfBlocksError,
    PackageError,
    PgenError,
    SequenceError,
    ShapeError,
    SpecError,
    TuneError,
)
from pgen_runtime.spec import AttentionSpec, load_spec

__version__ = "0.1.0"


def build_kernels(spec: AttentionSpec, target: str = "llvm", device: str | None = None, overrides=None):
    """Build (or reuse from the cache) and load the six kernels of `spec`; see `pgen.build`."""
    from .build import build_kernels as build

    return build(spec, target, device, overrides)

__all__ = [
    "AttentionSpec",
    "BuildError",
    "ModelImportError",
    "OutOfBlocksError",
    "PackageError",
    "PgenError",
    "SequenceError",
    "ShapeError",
    "SpecError",
    "TuneError",
    "build_kernels",
    "load_spec",
]
