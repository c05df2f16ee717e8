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
    "load_spec",
]
