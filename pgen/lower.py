"""Lowering: a spec and one config per kernel -> the scheduled TIR of every kernel of a package.

The rules in `pgen.schedules` hold the kernels: attention (decode, extend) as schedule templates,
as TVM's own paged kernels are (their online softmax and block-table gather do not come out of a
generic schedule), data movement as plain loop nests a rule binds to threads or vectorizes.
Every function is checked against the runtime's kernel table, which the loader binds by name.
"""

from __future__ import annotations

from typing import Any

from pgen_runtime.errors import BuildError
from pgen_runtime.kernel_table import SIGNATURES
from pgen_runtime.spec import AttentionSpec

from . import schedules
from .schedules import TargetInfo


def lower(spec: AttentionSpec, target: TargetInfo, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The scheduled PrimFunc of each kernel in `configs` (kernel name -> config naming its rule),
    with its exported symbol set.

    Raises:
        BuildError: a config's rule does not apply, or a function's parameters differ from the
            kernel table's.
    """
    funcs = {}
    for name, config in configs.items():
        func = schedules.schedule(name, spec, target, config)
        if func is None:
            raise BuildError(f"rule {config.get('rule')} does not apply to {name} of {spec.uri} on {target.kind}")
        params = tuple(p.name for p in func.params)
        if params != SIGNATURES[name].params:
            raise BuildError(f"{name}'s PrimFunc takes {params}; the kernel table says {SIGNATURES[name].params}")
        funcs[name] = func.with_attr("global_symbol", name)
    return funcs
