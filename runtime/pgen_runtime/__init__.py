"""pgen's embeddable runtime: loads pgen packages and owns the paged KV cache.

It needs numpy and apache-tvm-ffi only: never the TVM compiler, never torch.
"""

from __future__ import annotations

from .errors import (
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
from .spec import DTYPES, KV_LAYOUT, NULL_BLOCK_ID, AttentionSpec, load_spec

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "BuildError",
    "DTYPES",
    "KV_LAYOUT",
    "ModelImportError",
    "NULL_BLOCK_ID",
    "OutOfBlocksError",
    "PackageError",
    "PgenError",
    "SequenceError",
    "ShapeError",
    "SpecError",
    "TuneError",
    "load_spec",
]
