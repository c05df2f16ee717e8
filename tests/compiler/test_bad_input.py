"""Bad kernel arguments raise a typed ShapeError naming the parameter, before any kernel runs.

The kernels here are spies that fail the test when called, so "before any kernel runs" is checked
directly; every array is also compared byte for byte afterwards (nothing was written).
"""

from __future__ import annotations

import numpy as np
import pytest
import reference

from pgen import AttentionSpec, ShapeError
from pgen_runtime import PagedKernels
from pgen_runtime.kernel_table import KERNEL_NAMES as KERNELS

SPEC = AttentionSpec(num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=4, dtype="float32")


def _spy(name: str, calls: list):
    def run(*args):
        calls.append(name)
    return run


@pytest.fixture
def calls():
    return []


@pytest.fixture
def kernels(build_kernels, calls):
    """PagedKernels of SPEC whose compiled functions only record that they were called."""
    real = build_kernels(SPEC)
    return PagedKernels(SPEC, {n: _spy(n, calls) for n in KERNELS}, "cpu", real.configs)


@pytest.fixture
def args():
    """Valid arguments of every kernel: lengths 5 and 9 in an 11-block pool (block 0 is null)."""
    case = reference.paged_case(SPEC, [5, 9], [2, 3], spare_blocks=5)
    pool = case["pool"]
    return {
        "q": case["q_decode"], "out": np.zeros_like(case["q_decode"]), "kv_pool": pool,
        "block_tables": case["block_tables"], "seq_lens": case["seq_lens"],
        "q_ext": case["q_extend"], "out_ext": np.zeros_like(case["q_extend"]), "q_indptr": case["q_indptr"],
        "k": case["k"], "v": case["v"], "slot_mapping": case["slot_mapping"], "pairs": case["pairs"],
        "block_ids": case["swap_ids"], "host_buf": np.zeros((len(case["swap_ids"]), *pool.shape[1:]), pool.dtype),
    }


def _call(kernels, kernel: str, a: dict) -> None:
    if kernel == "decode":
        kernels.decode(a["q"], a["kv_pool"], a["block_tables"], a["seq_lens"], a["out"])
    elif kernel == "extend":
        kernels.extend(a["q_ext"], a["kv_pool"], a["block_tables"], a["q_indptr"], a["seq_lens"], a["out_ext"])
    elif kernel == "cache_write":
        kernels.cache_write(a["k"], a["v"], a["kv_pool"], a["slot_mapping"])
    elif kernel == "copy_blocks":
        kernels.copy_blocks(a["kv_pool"], a["pairs"])
    elif kernel == "swap_out":
        kernels.swap_out(a["kv_pool"], a["block_ids"], a["host_buf"])
    else:
        kernels.swap_in(a["host_buf"], a["block_ids"], a["kv_pool"])


def _with(a: dict, key: str, value) -> np.ndarray:
    """`a[key]` with `value` written at [0] (a copy: fixtures stay valid)."""
    array = a[key].copy()
    array.reshape(-1)[0] = value
    return array


# (kernel, parameter the message must name, change to the valid arguments)
BAD = [
    # shapes
    ("decode", "q", lambda a: {"q": a["q"][:, :, :16]}),
    ("decode", "q", lambda a: {"q": a["q"][:, :3]}),
    ("decode", "out", lambda a: {"out": a["out"][:1]}),
    ("decode", "kv_pool", lambda a: {"kv_pool": a["kv_pool"][:, :, :, :2]}),
    ("decode", "kv_pool", lambda a: {"kv_pool": a["kv_pool"][:, 0]}),
    ("decode", "block_tables", lambda a: {"block_tables": a["block_tables"][0]}),
    ("decode", "seq_lens", lambda a: {"seq_lens": a["seq_lens"][:1]}),
    ("extend", "q", lambda a: {"q_ext": a["q_ext"][:, :, :8]}),
    ("extend", "out", lambda a: {"out_ext": a["out_ext"][1:]}),
    ("extend", "q_indptr", lambda a: {"q_indptr": a["q_indptr"][:2]}),
    ("cache_write", "v", lambda a: {"v": a["v"][:-1]}),
    ("cache_write", "k", lambda a: {"k": a["k"][:, :1]}),
    ("cache_write", "slot_mapping", lambda a: {"slot_mapping": a["slot_mapping"][:-1]}),
    ("copy_blocks", "pairs", lambda a: {"pairs": a["pairs"][:, :1]}),
    ("copy_blocks", "pairs", lambda a: {"pairs": a["pairs"].reshape(-1)}),
    ("swap_out", "host_buf", lambda a: {"host_buf": a["host_buf"][:-1]}),
    ("swap_in", "host_buf", lambda a: {"host_buf": a["host_buf"][:, :, :1]}),
    # dtypes
    ("decode", "q", lambda a: {"q": a["q"].astype(np.float64)}),
    ("decode", "out", lambda a: {"out": a["out"].astype(np.float16)}),
    ("decode", "kv_pool", lambda a: {"kv_pool": a["kv_pool"].astype(np.float16)}),
    ("decode", "block_tables", lambda a: {"block_tables": a["block_tables"].astype(np.int64)}),
    ("decode", "seq_lens", lambda a: {"seq_lens": a["seq_lens"].astype(np.uint32)}),
    ("extend", "q_indptr", lambda a: {"q_indptr": a["q_indptr"].astype(np.int64)}),
    ("cache_write", "slot_mapping", lambda a: {"slot_mapping": a["slot_mapping"].astype(np.float32)}),
    ("copy_blocks", "pairs", lambda a: {"pairs": a["pairs"].astype(np.int16)}),
    ("swap_in", "block_ids", lambda a: {"block_ids": a["block_ids"].astype(np.int64)}),
    ("swap_out", "host_buf", lambda a: {"host_buf": a["host_buf"].astype(np.float64)}),
    # not arrays
    ("decode", "q", lambda a: {"q": a["q"].tolist()}),
    ("decode", "block_tables", lambda a: {"block_tables": a["block_tables"].tolist()}),
    ("decode", "kv_pool", lambda a: {"kv_pool": None}),
    ("extend", "q", lambda a: {"q_ext": a["q_ext"].tolist()}),
    ("extend", "q_indptr", lambda a: {"q_indptr": [0, 2, 5]}),
    ("cache_write", "k", lambda a: {"k": 1.0}),
    ("copy_blocks", "pairs", lambda a: {"pairs": [[1, 2]]}),
    ("swap_out", "block_ids", lambda a: {"block_ids": [1, 2, 3]}),
    ("swap_in", "host_buf", lambda a: {"host_buf": "buffer"}),
    # block ids
    ("decode", "block_tables", lambda a: {"block_tables": _with(a, "block_tables", 11)}),
    ("decode", "block_tables", lambda a: {"block_tables": _with(a, "block_tables", -1)}),
    ("decode", "block_tables", lambda a: {"block_tables": _with(a, "block_tables", 0)}),
    ("extend", "block_tables", lambda a: {"block_tables": _with(a, "block_tables", 99)}),
    ("copy_blocks", "pairs", lambda a: {"pairs": _with(a, "pairs", 11)}),
    ("copy_blocks", "pairs", lambda a: {"pairs": _with(a, "pairs", 0)}),
    ("swap_out", "block_ids", lambda a: {"block_ids": _with(a, "block_ids", 11)}),
    ("swap_in", "block_ids", lambda a: {"block_ids": _with(a, "block_ids", -2)}),
    # lengths
    ("decode", "seq_lens", lambda a: {"seq_lens": np.array([5, 17], np.int32)}),  # table holds 4 x 4
    ("decode", "seq_lens", lambda a: {"seq_lens": np.array([0, 9], np.int32)}),
    ("decode", "seq_lens", lambda a: {"seq_lens": np.array([5, -1], np.int32)}),
    ("extend", "seq_lens", lambda a: {"seq_lens": np.array([5, 100], np.int32)}),
    ("extend", "seq_lens", lambda a: {"seq_lens": np.array([1, 9], np.int32)}),  # 2 new tokens > 1
    # query offsets
    ("extend", "q_indptr", lambda a: {"q_indptr": np.array([1, 2, 5], np.int32)}),
    ("extend", "q_indptr", lambda a: {"q_indptr": np.array([0, 4, 3], np.int32)}),
    ("extend", "q_indptr", lambda a: {"q_indptr": np.array([0, 2, 4], np.int32)}),  # q has 5 rows
    # slots, pairs, swap ids
    ("cache_write", "slot_mapping", lambda a: {"slot_mapping": _with(a, "slot_mapping", 44)}),  # 11 x 4
    ("cache_write", "slot_mapping", lambda a: {"slot_mapping": np.array([7, 8, 9, 8, 11, 12, 13], np.int32)}),
    ("copy_blocks", "pairs", lambda a: {"pairs": np.array([[1, 6], [6, 7]], np.int32)}),  # dst 6 is a source
    ("copy_blocks", "pairs", lambda a: {"pairs": np.array([[1, 6], [2, 6]], np.int32)}),  # dst twice
    ("copy_blocks", "pairs", lambda a: {"pairs": np.array([[3, 3]], np.int32)}),
    ("swap_in", "block_ids", lambda a: {"block_ids": np.array([2, 5, 2], np.int32)}),
]


@pytest.mark.parametrize("kernel, param, change", BAD, ids=[f"{k}-{p}-{i}" for i, (k, p, _) in enumerate(BAD)])
def test_bad_argument_raises_before_any_kernel_runs(kernels, calls, args, kernel, param, change):
    bad = {**args, **change(args)}
    before = {k: v.copy() for k, v in bad.items() if isinstance(v, np.ndarray)}
    with pytest.raises(ShapeError) as err:
        _call(kernels, kernel, bad)
    assert param in str(err.value)
    assert calls == []
    for key, array in before.items():
        reference.assert_same_bytes(bad[key], array, key)


@pytest.mark.parametrize("kernel", KERNELS)
def test_valid_arguments_reach_the_kernel(kernels, calls, args, kernel):
    _call(kernels, kernel, args)
    assert calls == [kernel]


def test_null_block_is_fine_in_unused_table_slots_and_duplicates_in_swap_out(kernels, calls, args):
    assert (args["block_tables"][:, -1] == 0).all()  # the padding column
    kernels.decode(args["q"], args["kv_pool"], args["block_tables"], args["seq_lens"], args["out"])
    ids = np.array([3, 3], np.int32)
    kernels.swap_out(args["kv_pool"], ids, np.zeros((2, *args["kv_pool"].shape[1:]), np.float32))
    kernels.cache_write(args["k"], args["v"], args["kv_pool"], np.full(len(args["k"]), -1, np.int32))
    assert calls == ["decode", "swap_out", "cache_write"]


def test_a_plan_for_another_batch_is_refused(kernels, calls, args):
    plan = kernels.plan_decode(args["block_tables"][:1], args["seq_lens"][:1], len(args["kv_pool"]))
    with pytest.raises(ShapeError, match="plan"):
        kernels.decode(args["q"], args["kv_pool"], args["block_tables"], args["seq_lens"], args["out"], plan=plan)
    assert calls == []


def test_real_kernels_leave_everything_unchanged_on_bad_input(build_kernels, args):
    """The same checks guard the compiled kernels (not only the spies)."""
    real = build_kernels(SPEC)
    pool = args["kv_pool"].copy()
    with pytest.raises(ShapeError, match="pairs"):
        real.copy_blocks(args["kv_pool"], np.array([[1, 6], [6, 7]], np.int32))
    with pytest.raises(ShapeError, match="block_tables"):
        real.decode(args["q"], args["kv_pool"], _with(args, "block_tables", 0), args["seq_lens"], args["out"])
    reference.assert_same_bytes(args["kv_pool"], pool, "kv_pool")
    assert not args["out"].any()


def test_a_cuda_pool_of_2_31_elements_or_more_is_refused_naming_the_most_blocks(calls):
    # The CUDA kernels compute pool offsets in int32: a bigger pool would be read out of bounds.
    # (No GPU is needed: the check runs before anything is allocated or launched.)
    from pgen_runtime.errors import ConfigError
    from pgen_runtime.kernels import MAX_CUDA_POOL_ELEMENTS

    gpu = PagedKernels(SPEC, {n: _spy(n, calls) for n in KERNELS}, "cuda:0", {})
    per_block = int(np.prod(SPEC.pool_shape(1)))
    most = MAX_CUDA_POOL_ELEMENTS // per_block
    with pytest.raises(ConfigError, match=f"at most {most} blocks"):
        gpu.new_pool(most + 1)
    assert calls == []
