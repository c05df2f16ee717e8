"""pgen's embeddable runtime: loads pgen packages and owns the paged KV cache.

It needs numpy and apache-tvm-ffi only: never the TVM compiler, never torch.
"""

from __future__ import annotations

import os

# NOTE: TVM's CPU thread pool defaults to half the hardware threads (it assumes SMT) and pins the
# caller to core 0. pgen's CPU kernels are written for one task per core, so unless the user chose,
# use every core this process may run on. It must be set before the pool starts (first parallel call).
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

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
from .kernels import DecodePlan, ExtendPlan, PagedKernels
from .kv_cache_manager import KVCacheManager
from .engine import Engine
from .engine_outputs import CompletionOutput, EngineStats, RequestOutput
from .llm import LLM
from .package import load_package
from .preemption import PreemptionPolicy
from .prefix_cache import BlockHash, hash_block_tokens
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import KVMetrics, SeqStatus
from .spec import DTYPES, KV_LAYOUT, NULL_BLOCK_ID, AttentionSpec, load_spec
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "Block",
    "ByteTokenizer",
    "CompletionOutput",
    "BlockHash",
    "BlockPool",
    "BuildError",
    "ConfigError",
    "DTYPES",
    "DecodePlan",
    "Engine",
    "EngineStats",
    "ExtendPlan",
    "HFTokenizer",
    "KVCacheManager",
    "KVMetrics",
    "KV_LAYOUT",
    "LLM",
    "ModelImportError",
    "NULL_BLOCK_ID",
    "OutOfBlocksError",
    "PackageError",
    "PagedKernels",
    "PgenError",
    "PreemptionPolicy",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "SeqStatus",
    "SequenceError",
    "ShapeError",
    "SpecError",
    "TuneError",
    "hash_block_tokens",
    "load_package",
    "load_spec",
    "load_tokenizer",
]
