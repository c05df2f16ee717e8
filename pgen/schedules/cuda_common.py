"""What every CUDA attention rule shares: constants, the target's limits, the spec's score
constants, the split-KV knob and the split-KV merge kernel."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from tvm.script import tirx as T

from pgen_runtime.spec import AttentionSpec

from .base import Knob, TargetInfo

LOG2E = math.log2(math.e)
NEG = -3.0e38
# Dynamic shared memory a block may opt into: 163 KiB on sm_80/sm_87 (227 KiB on sm_90 is not
# used: a tuned sm_90 config must also build for the sm_80 half of a fat package); 99 KiB on the
# consumer archs.
DYN_SHARED_LIMIT = 163 * 1024
DYN_SHARED_LIMIT_SMALL = {"sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_120": 99 * 1024}
# NOTE: a cap on the split-KV factor the plan picks per call, not a factor: the workspace holds
# the call's splits only. Tuning keeps the default (pgen.tune.PLAN_CAPS).
MAX_SPLITS = Knob("max_splits", (8, 16, 32, 64, 128), 32)


def arch_number(arch: str) -> int:
    """80 for "sm_80" (and "sm_90a" -> 90); 0 where the target names no arch."""
    return int(re.sub(r"\D", "", arch) or 0)


def check_limits(target: TargetInfo, threads: int, smem: int, opt_in: bool = False) -> str | None:
    """Why a block of `threads` threads and `smem` bytes of shared memory cannot launch on
    `target`, or None. `opt_in`: the block takes dynamic shared memory up to the arch's opt-in
    limit rather than the static one."""
    if threads > target.max_threads_per_block:
        return f"{threads} threads per block > the target's limit {target.max_threads_per_block}"
    if opt_in:
        limit = DYN_SHARED_LIMIT_SMALL.get(target.arch.rstrip("a"), DYN_SHARED_LIMIT)
        if smem > limit:
            return f"{smem} bytes of shared memory > {limit}, the opt-in limit of {target.arch}"
    elif smem > target.max_shared_memory_per_block:
        return f"{smem} bytes of shared memory > the target's limit {target.max_shared_memory_per_block}"
    return None


class ScoreConstants(NamedTuple):
    """How a raw score q·k becomes a logit in log2 units (the softmax uses exp2)."""

    has_cap: bool
    q_scale: float  # the spec's scale; times log2(e) too where there is no soft-cap
    inv_cap: float  # with a soft-cap: logit = tanh(score * q_scale * inv_cap) * cap_log2e
    cap_log2e: float
    window: int  # keys visible before a query's position (a bound no position reaches without one)


def score_constants(spec: AttentionSpec) -> ScoreConstants:
    has_cap = spec.logit_softcap is not None
    return ScoreConstants(
        has_cap=has_cap,
        q_scale=spec.scale if has_cap else spec.scale * LOG2E,
        inv_cap=1.0 / spec.logit_softcap if has_cap else 1.0,
        cap_log2e=spec.logit_softcap * LOG2E if has_cap else 1.0,
        window=spec.sliding_window if spec.sliding_window is not None else 1 << 30,
    )


def split_merge(spec: AttentionSpec, rows: int):
    """The second kernel of split-KV decode: the online-softmax merge of each query row's split
    partials.

    Workspace layout: WO[((b * Hkv + h) * num_splits + split) * rows + row, D] (un-normalized outputs),
    WM[..., 2] (running max in log2 units, sum of weights); query head h * group + row % group.
    Returns a TVMScript macro `merge(WO, WM, out, q_indptr, num_splits, B)`.
    """
    hq, hkv, d, g, dtype = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.group_size, spec.dtype

    @T.macro
    def merge(WO, WM, out, q_indptr, num_splits, B):
        # NOTE: a grid of zero blocks is a launch error, so without splits one idle block runs.
        for bx in T.thread_binding(T.if_then_else(num_splits > 1, B * hq, 1), thread="blockIdx.x"):
            for tx in T.thread_binding(d, thread="threadIdx.x"):
                with T.sblock("merge"):
                    T.reads()
                    T.writes()
                    acc = T.sblock_alloc_buffer((3,), "float32", scope="local")
                    b = bx // hq
                    h = bx % hq // g
                    r = bx % g
                    acc[0] = T.float32(NEG)
                    for s in T.serial(num_splits):
                        acc[0] = T.max(acc[0], WM[(((b * hkv + h) * num_splits + s) * rows + r) * 2])
                    acc[1] = T.float32(0)
                    acc[2] = T.float32(0)
                    for s in T.serial(num_splits):
                        base = ((b * hkv + h) * num_splits + s) * rows + r
                        acc[1] = acc[1] + WM[base * 2 + 1] * T.exp2(WM[base * 2] - acc[0])
                        acc[2] = acc[2] + WO[base * d + tx] * T.exp2(WM[base * 2] - acc[0])
                    if num_splits > 1:
                        out[q_indptr[b], h * g + r, tx] = T.cast(acc[2] / T.max(acc[1], T.float32(1e-30)), dtype)

    return merge
