"""The schedule-rule interface: a rule turns a spec into a scheduled PrimFunc for one target.

A rule declares its knob space and default; `apply` returns None when the rule does not apply
(dlight's convention), and `check` prunes a configuration that breaks the target's limits before
anything is built.
"""

from __future__ import annotations

import functools
import itertools
import sys
from dataclasses import dataclass
from typing import Any, Iterator

from tvm.script import tirx as T
from tvm.tirx.script.parser.entry import TIRMacro, scan_macro

from pgen_runtime.spec import AttentionSpec

from .kv_codec import scale_words


@dataclass(frozen=True, slots=True)
class Knob:
    """One tunable parameter: its name, the values to search and the default."""

    name: str
    choices: tuple[Any, ...]
    default: Any

    def __post_init__(self) -> None:
        assert self.default in self.choices, (self.name, self.default, self.choices)


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """What a rule needs to know of a target: its kind and limits."""

    kind: str  # "llvm" or "cuda"
    arch: str = ""  # "sm_90", or the LLVM CPU name ("znver5")
    max_threads_per_block: int = 1024
    max_shared_memory_per_block: int = 48 * 1024
    vector_bits: int = 256  # widest SIMD register on a CPU
    features: frozenset[str] = frozenset()  # a CPU's instruction-set flags (/proc/cpuinfo names)


class ScheduleRule:
    """One kernel variant: subclasses set `kernel` and `target_kind` and implement the hooks.

    A config is a dict of the rule's knob values plus "rule": the rule's name, so a config (a
    tuning record, a manifest entry) always says which variant it builds.
    """

    kernel: str = ""
    target_kind: str = ""

    @property
    def name(self) -> str:
        return type(self).__name__

    def supports(self, spec: AttentionSpec, target: TargetInfo) -> str | None:
        """Why this variant cannot run `spec` on `target` at all, or None when it can."""
        return None

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        return ()

    def default(self, spec: AttentionSpec, target: TargetInfo) -> dict[str, Any]:
        return {"rule": self.name, **{k.name: k.default for k in self.knobs(spec, target)}}

    def check(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]) -> str | None:
        """Return why `config` cannot run on `target`, or None when it can."""
        return None

    def apply(self, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]):
        """Return the scheduled PrimFunc, or None when this rule does not apply."""
        raise NotImplementedError

    def space(self, spec: AttentionSpec, target: TargetInfo) -> Iterator[dict[str, Any]]:
        """Every configuration of the knob space that passes `check`, default first."""
        knobs = self.knobs(spec, target)
        default = self.default(spec, target)
        if self.check(spec, target, default) is None:  # a variant may not fit the target at all
            yield default
        for values in itertools.product(*(k.choices for k in knobs)):
            config = {"rule": self.name, **dict(zip((k.name for k in knobs), values))}
            if config != default and self.check(spec, target, config) is None:
                yield config


def elem_bytes(dtype: str) -> int:
    """Alignment a kernel may assume for a buffer of `dtype`: one element.

    NOTE: TVM assumes 64-byte aligned buffers by default and LLVM then emits aligned vector loads,
    which fault on a numpy array or a view that is only element-aligned. Kernels promise nothing
    more than what any DLPack tensor guarantees.
    """
    return {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int8": 1, "uint8": 1}[dtype]


def attention_func(spec: AttentionSpec, body, index64: bool = False):
    """The PrimFunc every decode and extend rule returns: the runtime's calling convention around
    `body`, a macro (a template's `_body` stage) called with (q, kv_pool, block_tables, q_indptr,
    seq_lens, out, num_splits, max_q_tiles, B, NT), which holds the rule's own workspace and loops.

    q and out are [NT, Hq, D]; the pool [NB, 2, Hkv, pool_rows, D] (pool_rows = block_size unless the
    KV is quantized); block tables int32 [B, MB]; q_indptr [B + 1] (decode passes 0..B);
    `num_splits` and `max_q_tiles` are the launch's split-KV and query-tile counts, which the
    runtime chooses per call. The body also sees `kv_scales`, the pool's memory as float32 words,
    where a quantized pool keeps its scales (`kv_codec`), and `kv_bytes`, the pool as one flat
    buffer (an int8 pool's interleaved code vectors may span slab rows).

    `index64`: the pool's block count is int64, so its element offsets are computed in int64 and a
    pool of more than 2^31 elements is addressed right (the CPU templates). The CUDA templates keep
    int32 offsets (64-bit addresses cost registers: a tuned kernel spilled) and the runtime refuses a
    CUDA pool of 2^31 elements or more (`pgen_runtime.kernels.MAX_CUDA_POOL_ELEMENTS`).
    """
    hq, hkv, d, rows = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.pool_rows
    dtype, kv_dtype = spec.dtype, spec.kv_storage_dtype
    words = 2 * hkv * scale_words(spec)

    @T.prim_func(s_tir=True)
    def attention(
        q_h: T.handle,
        pool_h: T.handle,
        bt_h: T.handle,
        indptr_h: T.handle,
        lens_h: T.handle,
        out_h: T.handle,
        num_splits: T.int32,
        max_q_tiles: T.int32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int32()
        NT = T.int32()
        NB = T.int64() if index64 else T.int32()
        MB = T.int32()
        q = T.match_buffer(q_h, (NT, hq, d), dtype, align=elem_bytes(dtype))
        kv_pool = T.match_buffer(pool_h, (NB, 2, hkv, rows, d), kv_dtype, align=elem_bytes(kv_dtype))
        block_tables = T.match_buffer(bt_h, (B, MB), "int32", align=4)
        q_indptr = T.match_buffer(indptr_h, (B + 1,), "int32", align=4)
        seq_lens = T.match_buffer(lens_h, (B,), "int32", align=4)
        out = T.match_buffer(out_h, (NT, hq, d), dtype, align=elem_bytes(dtype))
        kv_scales = T.decl_buffer((NB * words,), "float32", data=kv_pool.data)  # noqa: F841  # the body's
        kv_bytes = T.decl_buffer((NB * 2 * hkv * rows * d,), kv_dtype, data=kv_pool.data)  # noqa: F841  # the pool flat
        body(q, kv_pool, block_tables, q_indptr, seq_lens, out, num_splits, max_q_tiles, B, NT)

    return attention


@functools.cache
def _source(func):
    """A stage's parsed source: read once per process (inspect reads the file each time)."""
    return scan_macro(func, {})[0]


class _Stage(TIRMacro):
    """A TVMScript macro that sees both its call site's names and the values it was bound to."""

    def __init__(self, func, names: dict[str, Any]) -> None:
        super().__init__(_source(func), {}, func, hygienic=False)
        used = set(func.__code__.co_names)
        self.globals = {k: v for k, v in func.__globals__.items() if k in used}
        self.names = names

    def _find_parser_def(self):
        # TVM's version builds inspect.FrameInfo (source lines included) for every outer frame at
        # every call: with a template's dozens of stage expansions that was most of a build's time.
        frame = sys._getframe(1)
        while frame is not None:
            parser = frame.f_globals.get(self.parser_object_name)
            if parser is not None:
                return parser
            frame = frame.f_back
        raise RuntimeError(f"{self.parser_object_name} not available: a stage runs inside TVMScript only")

    def __call__(self, *args, **kwargs):
        parser = self._find_parser_def()
        with parser.var_table.with_frame():
            for table in (self.globals, self.names):
                for key, value in table.items():
                    parser.var_table.add(key, value)
            return super().__call__(*args, **kwargs)


def stage(func, names: dict[str, Any]):
    """`func`'s body (TVMScript) as a stage of a template: expanded in place where it is called,
    it uses the buffers and loop variables of that block, the template's Python values `names`
    (shared, not copied: a template binds every stage to one table holding all of them) and the
    globals of its module. A name in `names` hides one of the call site's; arguments hide both.

    NOTE: TVM's `T.macro` offers either scope (hygienic: the definition's; otherwise: the call
    site's); a template split into stages needs both. The macro object is made per template
    instance, so its block-name suffix counter (one per expansion) starts from zero each build.
    """
    macro = _Stage(func, names)
    return lambda *args, **kwargs: macro(*args, **kwargs)


def instantiate(spec: AttentionSpec, names: dict[str, Any], stages: dict[str, Any], index64: bool = False):
    """The PrimFunc of an attention template written in stages: every stage function of `stages`
    bound (`stage`) to the template's values `names` and to the other stages by name, and
    `stages["body"]` run inside `attention_func`."""
    for name, func in stages.items():
        names[name] = stage(func, names)
    return attention_func(spec, names["body"], index64)
