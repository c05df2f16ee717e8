"""The schedule-rule interface: a rule turns a spec into a scheduled PrimFunc for one target.

A rule declares its knob space and default; `apply` returns None when the rule does not apply
(dlight's convention), and `check` prunes a configuration that breaks the target's limits before
anything is built.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

from pgen_runtime.spec import AttentionSpec


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


class ScheduleRule:
    """Base class: subclasses set `kernel` and `target_kind`, and implement the hooks."""

    kernel: str = ""
    target_kind: str = ""

    def knobs(self, spec: AttentionSpec, target: TargetInfo) -> tuple[Knob, ...]:
        return ()

    def default(self, spec: AttentionSpec, target: TargetInfo) -> dict[str, Any]:
        return {k.name: k.default for k in self.knobs(spec, target)}

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
        yield default
        for values in itertools.product(*(k.choices for k in knobs)):
            config = dict(zip((k.name for k in knobs), values))
            if config != default and self.check(spec, target, config) is None:
                yield config


def elem_bytes(dtype: str) -> int:
    """Alignment a kernel may assume for a buffer of `dtype`: one element.

    NOTE: TVM assumes 64-byte aligned buffers by default and LLVM then emits aligned vector loads,
    which fault on a numpy array or a view that is only element-aligned. Kernels promise nothing
    more than what any DLPack tensor guarantees.
    """
    return {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4}[dtype]
