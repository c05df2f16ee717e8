"""pgen's embeddable runtime: loads pgen packages and owns the paged KV cache.

It needs numpy and apache-tvm-ffi only: never the TVM compiler, never torch.
"""

from __future__ import annotations

from .block_pool import Block, BlockPool
from .errors import (
    BuildError,
    ConfigError,
    ModelImportError,
    OutOfBlocksError,
    PackageError,
    PgenError,
    SequenceError,
    ShapeError,
    SpecError,
    TuneError,
)
from .kv_cache_manager import KVCacheManager
from .preemption import PreemptionPolicy
from .prefix_cache import BlockHash, hash_block_tokens
from .sequence import KVMetrics, SeqStatus
from .spec import DTYPES, KV_LAYOUT, NULL_BLOCK_ID, AttentionSpec, load_spec

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "Block",
    "BlockHash",
    "BlockPool",
    "BuildError",
    "ConfigError",
    "DTYPES",
    "KVCacheManager",
    "KVMetrics",
    "KV_LAYOUT",
    "ModelImportError",
    "NULL_BLOCK_ID",
    "OutOfBlocksError",
    "PackageError",
    "PgenError",
    "PreemptionPolicy",
    "SeqStatus",
    "SequenceError",
    "ShapeError",
    "SpecError",
    "TuneError",
    "hash_block_tokens",
    "load_spec",
]
