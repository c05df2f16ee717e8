"""Schedule rules, one kernel variant per file, and the registry that picks one per kernel and target.

Per kernel and target kind the rules are tried in order, the fallback last (TVM dlight's
convention): the first whose `supports` accepts the spec on the target, and whose default config
fits it, is the default variant. Tuning searches every variant that supports the spec; a config
names its variant (`config["rule"]`), so builds, tuning logs and manifests say which one runs.
"""

from __future__ import annotations

from typing import Any

from pgen_runtime.spec import AttentionSpec

from .base import Knob, ScheduleRule, TargetInfo
from .cpu_decode import CpuDecode
from .cpu_extend import CpuExtend
from .cuda_decode_mma import CudaDecodeMma
from .cuda_decode_simt import CudaDecodeSimt
from .cuda_extend_mma import CudaExtendMma
from .cuda_extend_simt import CudaExtendSimt
from .cuda_prelude import CUDA_PRELUDE
from .data_movement import DATA_MOVEMENT, DataMovement

# Kernel -> target kind -> its variants, in the order they are tried (fallback last).
RULES: dict[str, dict[str, tuple[ScheduleRule, ...]]] = {
    "decode": {"llvm": (CpuDecode(),), "cuda": (CudaDecodeMma(), CudaDecodeSimt())},
    "extend": {"llvm": (CpuExtend(),), "cuda": (CudaExtendMma(), CudaExtendSimt())},
    **{name: {kind: (DataMovement(name, kind),) for kind in ("llvm", "cuda")} for name in DATA_MOVEMENT},
}


def rules_for(kernel: str, target_kind: str) -> tuple[ScheduleRule, ...]:
    """The variants of `kernel` ("decode", "extend", ...) for "llvm" or "cuda", in order."""
    try:
        return RULES[kernel][target_kind]
    except KeyError:
        raise KeyError(f"no schedule rule for kernel {kernel!r} on {target_kind!r}") from None


def rule_named(kernel: str, target_kind: str, name: str) -> ScheduleRule:
    """The variant of `kernel` on `target_kind` called `name`.

    Raises:
        KeyError: no such variant; the message lists the variants.
    """
    rules = rules_for(kernel, target_kind)
    for rule in rules:
        if rule.name == name:
            return rule
    raise KeyError(f"{name!r} is not a {kernel} rule for {target_kind} (the rules are {[r.name for r in rules]})")


def applicable(kernel: str, spec: AttentionSpec, target: TargetInfo) -> tuple[ScheduleRule, ...]:
    """The variants of `kernel` that support `spec` on `target`, in order."""
    return tuple(rule for rule in rules_for(kernel, target.kind) if rule.supports(spec, target) is None)


def rule_for(kernel: str, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any] | None = None) -> ScheduleRule:
    """The variant `config` names, or (no config, or one without "rule") the default variant:
    the first that supports `spec` on `target` with its default config.

    Raises:
        KeyError: `config` names a rule that is not a variant of `kernel` on this target kind.
    """
    if config is not None and "rule" in config:
        return rule_named(kernel, target.kind, config["rule"])
    rules = rules_for(kernel, target.kind)
    for rule in rules:
        if rule.supports(spec, target) is None and rule.check(spec, target, rule.default(spec, target)) is None:
            return rule
    return rules[-1]


def default_config(kernel: str, spec: AttentionSpec, target: TargetInfo) -> dict[str, Any]:
    """The default variant's default config."""
    return rule_for(kernel, spec, target).default(spec, target)


def check(kernel: str, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]) -> str | None:
    """Why `config` (naming its rule) cannot run `kernel` of `spec` on `target`, or None."""
    rule = rule_for(kernel, spec, target, config)
    return rule.supports(spec, target) or rule.check(spec, target, config)


def schedule(kernel: str, spec: AttentionSpec, target: TargetInfo, config: dict[str, Any]):
    """The scheduled PrimFunc of `kernel` for `spec` on `target` with `config`, or None where the
    config's rule does not apply."""
    return rule_for(kernel, spec, target, config).apply(spec, target, config)


__all__ = ["CUDA_PRELUDE", "RULES", "Knob", "ScheduleRule", "TargetInfo", "applicable", "check",
           "default_config", "rule_for", "rule_named", "rules_for", "schedule"]
