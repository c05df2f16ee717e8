"""All six CPU kernels against the float64 reference, over the spec grid of the kernels issue.

Inputs are random with random block placement and NaN in every slot no sequence uses, so a kernel
that reads a padded slot, an unused block or the null block shows NaN in its output.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import pgen
import pytest
import reference
from kernel_grid import ALL, lengths

from pgen_runtime import DecodePlan
from pgen_runtime.target import host_cpu_features
from pgen_runtime.kernels import CUDA_BLOCKS_PER_SM, decode_splits
from pgen import schedules
from pgen.schedules.cpu_decode import CpuDecode
from pgen.schedules.cpu_extend import CpuExtend

CPU_RULES = {"decode": CpuDecode(), "extend": CpuExtend()}


def _extend_tokens(spec) -> list[int]:
    """New tokens per sequence of `lengths(spec)`: two pure prefills, a block-crossing step, a chunk."""
    bs = spec.block_size
    return [1, max(bs - 1, 1), 2, 67]


@pytest.mark.parametrize("spec", ALL)
def test_all_six_kernels_match_the_reference(spec, build_kernels):
    case = reference.paged_case(spec, lengths(spec), _extend_tokens(spec), seed=spec.head_dim)
    got = reference.run_kernels(build_kernels(spec), case)
    reference.assert_kernels_match(spec, got, reference.expected(spec, case))


@pytest.mark.parametrize("splits", [2, 3, "max"])
@pytest.mark.parametrize("spec", ALL)
def test_split_kv_decode_merges_to_the_same_result(spec, splits):
    # A tuning log may have picked max_splits=1 for this spec: build with room to split.
    kernels = pgen.build_kernels(spec, overrides={"decode": {"max_splits": 8}})
    splits = kernels.configs["decode"]["max_splits"] if splits == "max" else splits
    _assert_decode_in_splits_matches_the_reference(spec, kernels, splits, seed=splits)


def _assert_decode_in_splits_matches_the_reference(spec, kernels, splits: int, seed: int) -> None:
    case = reference.paged_case(spec, lengths(spec), seed=seed)
    pool, tables, lens, q = case["pool"], case["block_tables"], case["seq_lens"], case["q_decode"]
    plan = DecodePlan(num_splits=splits, batch=len(lens), indptr=np.arange(len(lens) + 1, dtype=np.int32))
    out = np.full_like(q, np.nan)
    kernels.decode(q, pool, tables, lens, out, plan=plan)
    reference.assert_attention_close(spec, out, reference.decode(spec, q, pool, tables, lens), "decode",
                                     reference.weight_rounding_allowance(spec, q, pool, tables, lens))
    reference.assert_same_bytes(pool, case["pool"], "kv_pool after decode")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("spec", ALL)
def test_cpu_decode_with_two_kv_streams_matches_the_reference(spec, splits):
    # kv_streams 2: a task's blocks in two runs read side by side into one online softmax. Splits
    # of 1 and 3 give runs of odd and even lengths, a second run shorter than the first or empty
    # (1 block), and runs that start or end in a partial block.
    kernels = pgen.build_kernels(spec, overrides={"decode": {"kv_streams": 2, "max_splits": 8}})
    assert kernels.configs["decode"]["kv_streams"] == 2
    _assert_decode_in_splits_matches_the_reference(spec, kernels, splits, seed=splits + 7)


INT8_DOT_SPECS = [p for p in ALL if p.values[0].kv_dtype == "int8" and p.values[0].block_size % 16 == 0]


@pytest.mark.skipif("avx512_vnni" not in host_cpu_features(), reason="qk_int8 needs AVX-512 VNNI on the host")
@pytest.mark.parametrize("spec", INT8_DOT_SPECS + [pytest.param(pgen.AttentionSpec(
    num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16", kv_dtype="int8", sliding_window=100,
    logit_softcap=30.0, scale=0.3), id="int8-window-softcap")])
def test_int8_dot_scores_are_those_of_int8_queries(spec):
    # qk_int8: VNNI integer dots of int8 query codes with the interleaved K codes, the same scores
    # as the float loop's (an int8 cache always scores int8 queries: reference.int8_queries). With
    # float P·V both match the reference at the dtype's tolerance; pv_int8 (u8 weights) within the
    # weights' rounding allowance beyond it.
    def build(qk, pv):
        return pgen.build_kernels(spec, overrides={name: {"qk_int8": qk, "pv_int8": pv, "max_splits": 8}
                                                   for name in ("decode", "extend")})

    variants = {"qk_int8": (build(1, 0), False), "float loops": (build(0, 0), False), "qk_int8 + pv_int8": (build(1, 1), True)}
    assert variants["qk_int8 + pv_int8"][0].configs["extend"]["pv_int8"] == 1
    case = reference.paged_case(spec, lengths(spec), _extend_tokens(spec), seed=3)
    pool, tables, lens = case["pool"], case["block_tables"], case["seq_lens"]
    want = reference.decode(spec, case["q_decode"], pool, tables, lens)
    allowance = reference.weight_rounding_allowance(spec, case["q_decode"], pool, tables, lens)
    want_ext = reference.extend(spec, case["q_extend"], pool, tables, case["q_indptr"], lens)
    allowance_ext = reference.weight_rounding_allowance(spec, case["q_extend"], pool, tables, lens, case["q_indptr"])
    for what, (kernels, rounded) in variants.items():
        for splits in (1, 3):
            out = np.full_like(case["q_decode"], np.nan)
            plan = DecodePlan(num_splits=splits, batch=len(lens), indptr=np.arange(len(lens) + 1, dtype=np.int32))
            kernels.decode(case["q_decode"], pool, tables, lens, out, plan=plan)
            reference.assert_attention_close(spec, out, want, f"decode, {what}, {splits} splits",
                                             allowance if rounded else None)
        out = np.full_like(case["q_extend"], np.nan)
        kernels.extend(case["q_extend"], pool, tables, case["q_indptr"], lens, out)
        reference.assert_attention_close(spec, out, want_ext, f"extend, {what}", allowance_ext if rounded else None)


@pytest.mark.parametrize("lanes", [4, 8, 16])
@pytest.mark.parametrize("spec", [
    pytest.param(pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=96, block_size=16, dtype="float32",
                                    kv_dtype="int8", sliding_window=37, logit_softcap=10.0, scale=0.4), id="int8-window-softcap"),
    pytest.param(pgen.AttentionSpec(num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=8, dtype="float16",
                                    kv_dtype="int8"), id="int8-bs8")])
def test_int8_float_loops_of_every_vector_width_match_the_reference(spec, lanes):
    # Without VNNI (or with its loops off) an int8 pool's interleaved codes are read by the quads
    # loops: QK vectors of lanes/4 keys x 4 dims, P·V vectors of lanes/4 dims x 4 keys. 8 lanes is
    # an AVX2 host's width, 4 an SSE one's; every width must score and sum exactly.
    from pgen.target import parse_targets

    info = parse_targets("llvm")[0].info

    def off(name):  # the VNNI loops this host and spec offer, switched off
        return {k: 0 for k in ("qk_int8", "pv_int8") if k in schedules.default_config(name, spec, info)}

    kernels = pgen.build_kernels(spec, overrides={name: {**off(name), "vector_lanes": lanes, "max_splits": 8}
                                                  for name in ("decode", "extend")})
    case = reference.paged_case(spec, lengths(spec), _extend_tokens(spec), seed=lanes)
    pool, tables, lens = case["pool"], case["block_tables"], case["seq_lens"]
    for splits in (1, 3):
        out = np.full_like(case["q_decode"], np.nan)
        plan = DecodePlan(num_splits=splits, batch=len(lens), indptr=np.arange(len(lens) + 1, dtype=np.int32))
        kernels.decode(case["q_decode"], pool, tables, lens, out, plan=plan)
        reference.assert_attention_close(spec, out, reference.decode(spec, case["q_decode"], pool, tables, lens),
                                         f"decode, {lanes} lanes, {splits} splits")
    out = np.full_like(case["q_extend"], np.nan)
    kernels.extend(case["q_extend"], pool, tables, case["q_indptr"], lens, out)
    reference.assert_attention_close(spec, out, reference.extend(spec, case["q_extend"], pool, tables, case["q_indptr"], lens),
                                     f"extend, {lanes} lanes")


def test_int8_dot_is_refused_where_it_cannot_build():
    from pgen.target import parse_targets

    info = parse_targets("llvm")[0].info
    for spec in (pgen.AttentionSpec(num_q_heads=8, num_kv_heads=2, head_dim=64, kv_dtype="fp8_e4m3"),
                 pgen.AttentionSpec(num_q_heads=8, num_kv_heads=2, head_dim=96, block_size=8, kv_dtype="int8")):
        config = {**schedules.default_config("decode", spec, info), "qk_int8": 1}
        assert "qk_int8 needs kv_dtype int8" in schedules.check("decode", spec, info, config)


@pytest.mark.parametrize("splits", [2, 3, "max"])
@pytest.mark.parametrize("spec", ALL)
def test_split_kv_extend_merges_to_the_same_result(spec, splits):
    # Extend's tiles split over the KV like decode's (the engine's decode steps and short chunks on
    # more threads than tiles): one-token rows, a block-crossing step, a 67-token chunk.
    kernels = pgen.build_kernels(spec, overrides={"extend": {"max_splits": 8}})
    splits = kernels.configs["extend"]["max_splits"] if splits == "max" else splits
    case = reference.paged_case(spec, lengths(spec), _extend_tokens(spec), seed=splits)
    args = case["q_extend"], case["pool"], case["block_tables"], case["q_indptr"], case["seq_lens"]
    plan = dataclasses.replace(kernels.plan_extend(*args[2:]), num_splits=splits)
    out = np.full_like(case["q_extend"], np.nan)
    kernels.extend(*args, out, plan=plan)
    reference.assert_attention_close(spec, out, reference.extend(spec, *args), "extend",
                                     reference.weight_rounding_allowance(spec, *args[:3], args[4], args[3]))
    reference.assert_same_bytes(case["pool"], reference.paged_case(spec, lengths(spec), _extend_tokens(spec),
                                                                   seed=splits)["pool"], "kv_pool after extend")


def test_cpu_extend_plan_splits_where_tiles_leave_threads_idle():
    from pgen_runtime.kernels import extend_splits

    spec = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
    config = {"kv_heads_per_task": 8, "max_splits": 8, "q_tile": 4}
    one = np.array([1], np.int32)
    # A decode step of one 16k-token sequence: one tile, two threads.
    assert extend_splits(spec, config, one, np.array([16384], np.int32), "cpu", 2) == 2
    assert extend_splits(spec, config, one, np.array([16384], np.int32), "cpu", 16) == 8  # max_splits
    assert extend_splits(spec, config, one, np.array([200], np.int32), "cpu", 16) == 1  # < 2 x 128 keys
    assert extend_splits(spec, config, np.ones(2, np.int32), np.full(2, 4096, np.int32), "cpu", 2) == 1
    assert extend_splits(spec, config, np.array([2048]), np.array([2048], np.int32), "cpu", 16) == 1  # 512 tiles
    assert extend_splits(spec, config, one, np.array([16384], np.int32), "cuda", 1024) == 1
    kernels = pgen.build_kernels(pgen.AttentionSpec(8, 8, 64, 8, "float32"), overrides={"extend": {"max_splits": 2}})
    case = reference.paged_case(kernels.spec, [40, 50], [1, 1])
    args = case["q_extend"], case["pool"], case["block_tables"], case["q_indptr"], case["seq_lens"]
    out = np.full_like(case["q_extend"], np.nan)
    with pytest.raises(pgen.ShapeError, match="num_splits=3 is outside 1..2"):
        kernels.extend(*args, out, plan=dataclasses.replace(kernels.plan_extend(*args[2:]), num_splits=3))
    assert np.isnan(out).all()


def test_a_plan_with_more_splits_than_the_workspace_holds_is_refused():
    spec = pgen.AttentionSpec(8, 8, 64, 8, "float32")
    kernels = pgen.build_kernels(spec, overrides={"decode": {"max_splits": 2}})
    case = reference.paged_case(spec, [40, 50])
    out = np.full_like(case["q_decode"], np.nan)
    plan = DecodePlan(num_splits=3, batch=2, indptr=np.arange(3, dtype=np.int32))
    with pytest.raises(pgen.ShapeError, match="num_splits=3 is outside 1..2"):
        kernels.decode(case["q_decode"], case["pool"], case["block_tables"], case["seq_lens"], out, plan=plan)
    assert np.isnan(out).all()


def test_cpu_plan_gives_one_short_sequence_every_thread():
    # A decode of one 512-token sequence ran as one task on one of 2 cores before (256 vs 167 us).
    spec = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
    config = {"kv_heads_per_task": 8, "max_splits": 8}
    assert decode_splits(spec, config, np.array([512], np.int32), "cpu", 2) == 2
    assert decode_splits(spec, config, np.array([512], np.int32), "cpu", 16) == 4  # >= 128 keys a split
    assert decode_splits(spec, config, np.array([100], np.int32), "cpu", 2) == 1
    assert decode_splits(spec, config, np.array([512, 512], np.int32), "cpu", 2) == 1
    assert decode_splits(spec, config, np.array([1 << 20], np.int32), "cpu", 64) == 8  # capped by max_splits


def test_cuda_plan_fills_the_gpu_at_medium_batches():
    # H200: 8 x 4096 tokens took 105 us at the 5 splits of 2 blocks per SM, 86 us at 16.
    spec = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")
    lens = np.full(8, 4096, np.int32)
    assert decode_splits(spec, {"max_splits": 32}, lens, "cuda", CUDA_BLOCKS_PER_SM * 132) == 16
    assert decode_splits(spec, {"max_splits": 32}, np.full(64, 4096, np.int32), "cuda", CUDA_BLOCKS_PER_SM * 132) == 3


@pytest.mark.parametrize("spec", ALL)
def test_plan_splits_long_contexts_when_the_batch_is_small(spec, monkeypatch):
    kernels = pgen.build_kernels(spec, overrides={"decode": {"max_splits": 8}})
    monkeypatch.setattr(kernels, "parallelism", 1024)
    case = reference.paged_case(spec, [2048 + 1, 5000], seed=7)
    pool, tables, lens, q = case["pool"], case["block_tables"], case["seq_lens"], case["q_decode"]
    plan = kernels.plan_decode(tables, lens, len(pool))
    assert plan.num_splits > 1
    out = np.full_like(q, np.nan)
    kernels.decode(q, pool, tables, lens, out, plan=plan)
    reference.assert_attention_close(spec, out, reference.decode(spec, q, pool, tables, lens), "decode",
                                     reference.weight_rounding_allowance(spec, q, pool, tables, lens))


@pytest.mark.parametrize("spec", ALL)
def test_chunked_prefill_continues_where_the_last_chunk_stopped(spec, build_kernels):
    """Prefill one sequence in chunks (the others idle with 0 new tokens) and all at once."""
    kernels = build_kernels(spec)
    total = 3 * spec.block_size + 5
    chunks = [spec.block_size + 3, 1, total - spec.block_size - 4]
    case = reference.paged_case(spec, [total, 9], [total, 0], seed=3)
    pool, tables = case["pool"], case["block_tables"]
    whole = np.full_like(case["q_extend"], np.nan)
    kernels.extend(case["q_extend"], pool, tables, case["q_indptr"], case["seq_lens"], whole)
    allowance = reference.weight_rounding_allowance(spec, case["q_extend"], pool, tables, case["seq_lens"], case["q_indptr"])
    reference.assert_attention_close(spec, whole, reference.extend(spec, case["q_extend"], pool, tables,
                                                                   case["q_indptr"], case["seq_lens"]), "prefill", allowance)
    done = 0
    for n in chunks:
        lens = np.array([done + n, 9], np.int32)
        indptr = np.array([0, n, n], np.int32)
        q = case["q_extend"][done : done + n]
        out = np.full_like(q, np.nan)
        kernels.extend(q, pool, tables, indptr, lens, out)
        # (a chunk's u8 P·V weights round as the whole prefill's, up to float rounding: twice the allowance)
        reference.assert_attention_close(spec, out, whole[done : done + n].astype(np.float64), f"chunk at {done}",
                                         2 * allowance[done : done + n])
        done += n
    reference.assert_same_bytes(pool, case["pool"], "kv_pool after extend")


@pytest.mark.parametrize("spec", ALL)
def test_cpu_extend_launches_only_the_slots_all_tiles_need(spec, build_kernels):
    """One long run beside one-token rows: the CPU plan asks for batch x slots >= all query tiles
    (far fewer than the longest run's tiles per sequence), and every row still comes out right."""
    kernels = build_kernels(spec)
    qt = kernels.configs["extend"]["q_tile"]
    tiles = -(-64 // qt) + 15
    for lens, new in (([70] + [5] * 15, [64] + [1] * 15), ([5] * 15 + [70], [1] * 15 + [64])):
        case = reference.paged_case(spec, lens, new, seed=5)
        args = (case["block_tables"], case["q_indptr"], case["seq_lens"])
        plan = kernels.plan_extend(*args)
        assert plan.max_q_tiles == -(-tiles // 16) < -(-64 // qt)
        out = np.full_like(case["q_extend"], np.nan)
        kernels.extend(case["q_extend"], case["pool"], *args, out, plan=plan)
        want = reference.extend(spec, case["q_extend"], case["pool"], *args)
        reference.assert_attention_close(spec, out, want, f"extend, long run {'first' if new[0] > 1 else 'last'}",
                                         reference.weight_rounding_allowance(spec, case["q_extend"], case["pool"], args[0],
                                                                             args[2], args[1]))


def test_cuda_group_rows_knob_only_where_it_lowers():
    from pgen.schedules.cuda_decode_simt import CudaDecodeSimt
    from pgen.target import parse_targets

    info = parse_targets("cuda:sm_90")[0].info
    rule = CudaDecodeSimt()
    llama = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")
    phi = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=32, head_dim=96, block_size=16, dtype="float16")
    assert "group_rows" in {k.name for k in rule.knobs(llama, info)}
    assert "group_rows" not in {k.name for k in rule.knobs(phi, info)}  # no GQA group to share
    base = {**rule.default(llama, info), "group_rows": 4}
    assert rule.check(llama, info, {**base, "vector": 8}) is None  # 16 lanes: warp shuffles
    assert "warp-shuffle" in rule.check(llama, info, {**base, "vector": 2})  # 64 lanes: generic allreduce
    assert "does not divide" in rule.check(llama, info, {**base, "group_rows": 3})


def _assert_decode_and_extend_match_the_reference(spec, kernels, seed: int) -> None:
    """Decode and extend of `kernels` on the grid's lengths for `spec` against the float64 reference."""
    case = reference.paged_case(spec, lengths(spec), _extend_tokens(spec), seed=seed)
    want = reference.expected(spec, case)
    got = reference.run_kernels(kernels, case)
    for what in ("decode", "extend"):
        reference.assert_attention_close(spec, got[what], want[what], what, want[f"{what}_allowance"])


@pytest.mark.parametrize("heads_per_task", [1, "all"])
@pytest.mark.parametrize("spec", ALL)
def test_cpu_memory_request_knobs_match_the_reference(spec, heads_per_task):
    # The other values of the memory requests' knobs than the defaults (V touches off, only the
    # next head's K rows requested, into L2), in decode and in extend, whose V touches keep a
    # slot per task alive. One KV head per task sends the requests to the next block's rows.
    hpt = 1 if heads_per_task == 1 else spec.num_kv_heads
    knobs = {"touch_v": 0, "prefetch_next_head": 1, "prefetch_head_locality": 2, "kv_heads_per_task": hpt}
    kernels = pgen.build_kernels(spec, overrides={"decode": knobs, "extend": {**knobs, "touch_v": 1}})
    assert kernels.configs["extend"]["prefetch_next_head"] == 1 and kernels.configs["extend"]["touch_v"] == 1
    _assert_decode_and_extend_match_the_reference(spec, kernels, seed=spec.head_dim + 5)


@pytest.mark.parametrize("extend_qk", [0, 1])
@pytest.mark.parametrize("spec", ALL)
def test_both_cpu_score_loops_match_the_reference(spec, extend_qk):
    # The default QK loop goes key by key; tuning logs may pick the transposed one (across vector
    # lanes): build decode with it and extend with each loop, wherever the block size allows it.
    lanes = pgen.build_kernels(spec).configs["decode"]["vector_lanes"]
    if spec.block_size % lanes:
        pytest.skip(f"block_size {spec.block_size} is not a multiple of vector_lanes {lanes}")
    if spec.kv_dtype == "int8":
        pytest.skip("an int8 pool's interleaved K is scored by qk_int8 or the quads loop only")
    kernels = pgen.build_kernels(spec, overrides={"decode": {"qk_transpose": 1}, "extend": {"qk_transpose": extend_qk}})
    assert (kernels.configs["decode"]["qk_transpose"], kernels.configs["extend"]["qk_transpose"]) == (1, extend_qk)
    _assert_decode_and_extend_match_the_reference(spec, kernels, seed=spec.head_dim + 1)


@pytest.mark.parametrize("spec", ALL + [pytest.param(pgen.AttentionSpec(num_q_heads=8, num_kv_heads=2, head_dim=40, block_size=8,
                                                                          dtype="float32"), id="d40-odd-vector-count")])
def test_cpu_qk_accumulator_chains_and_row_merge_match_the_reference(spec):
    # The key-by-key QK loop with the other accumulator count than the default (2 chains: even and
    # odd vectors, head_dim 40 in 8 lanes leaves an odd one to the first chain) and, where it
    # applies, the other way of summing lanes (rows one at a time, or merged across rows).
    from pgen.target import parse_targets

    info = parse_targets("llvm")[0].info
    flip = {}
    for k in ("decode", "extend"):
        default = schedules.default_config(k, spec, info)
        flip[k] = {"qk_chains": 3 - default["qk_chains"], **({"qk_transpose": 0} if "qk_transpose" in default else {})}
        if "qk_row_merge" in default:
            flip[k]["qk_row_merge"] = 1 - default["qk_row_merge"]
    kernels = pgen.build_kernels(spec, overrides=flip)
    assert all(kernels.configs[k][name] == v for k in flip for name, v in flip[k].items())
    _assert_decode_and_extend_match_the_reference(spec, kernels, seed=spec.head_dim + 3)


@pytest.mark.parametrize("spec", ALL + [
    pytest.param(pgen.AttentionSpec(num_q_heads=16, num_kv_heads=8, head_dim=64, block_size=32, dtype="float16",
                                    logit_softcap=30.0, sliding_window=40), id="softcap-window-bs32"),
    pytest.param(pgen.AttentionSpec(num_q_heads=32, num_kv_heads=4, head_dim=64, block_size=16, dtype="float32"), id="group8")])
def test_cpu_qk_key_groups_match_the_reference(spec):
    # The key-group QK loop (rows x keys per group of vector_lanes accumulators, head dimension
    # outermost) wherever the block size allows it: group sizes 16 (no GQA), 8, 4 and 2 keys, partial
    # groups at the grid's lengths (keys past a sequence's end are read and masked), window and cap.
    from pgen.target import parse_targets

    info = parse_targets("llvm")[0].info
    offered = [k for k in ("decode", "extend") if "qk_key_group" in {knob.name for knob in CPU_RULES[k].knobs(spec, info)}]
    if not offered:
        pytest.skip(f"block_size {spec.block_size} is not a multiple of the vector lanes")
    kernels = pgen.build_kernels(spec, overrides={k: {"qk_key_group": 1} for k in offered})
    assert all(kernels.configs[k]["qk_key_group"] == 1 for k in offered)
    _assert_decode_and_extend_match_the_reference(spec, kernels, seed=spec.head_dim + 5)


def test_cpu_qk_loops_are_exclusive():
    from pgen.target import parse_targets

    info = parse_targets("llvm")[0].info
    llama = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")
    rule = CpuDecode()
    assert rule.default(llama, info)["qk_key_group"] == 0  # slower from DRAM: the tuner picks it
    assert "two QK loops" in rule.check(llama, info, {**rule.default(llama, info), "qk_transpose": 1, "qk_key_group": 1})
    lanes = rule.default(llama, info)["vector_lanes"]  # 16 with AVX-512, 8 with AVX2
    assert "qk_key_group" not in rule.default(dataclasses.replace(llama, block_size=lanes // 2), info)


def test_cpu_decode_pads_its_row_tile_to_a_power_of_two_where_that_is_cheap():
    from pgen.target import parse_targets
    from pgen.schedules.cpu_template import decode_rows

    assert [decode_rows(g) for g in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)] == [1, 2, 4, 4, 5, 8, 8, 8, 12, 16]
    # Qwen2.5's group of 7 becomes an 8-row tile: the row-merged lane sums and the key-group loop
    # apply (both need a power of two); the padded row is masked (the grid's (14, 2) specs check it).
    qwen = pgen.AttentionSpec(num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16")
    names = {k.name for k in CpuDecode().knobs(qwen, parse_targets("llvm")[0].info)}
    assert {"qk_row_merge", "qk_key_group", "kv_streams"} <= names


def test_cpu_qk_accumulator_chain_and_row_merge_defaults():
    from pgen.target import parse_targets

    info = parse_targets("llvm")[0].info
    llama = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")
    qwen = pgen.AttentionSpec(num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16")
    # Two chains per row where a tile has 4 rows or fewer; Qwen2.5's decode tile (7 rows padded to 8) keeps one.
    assert schedules.default_config("decode", llama, info)["qk_chains"] == 2
    assert schedules.default_config("decode", qwen, info)["qk_chains"] == 1
    assert schedules.default_config("extend", qwen, info)["qk_chains"] == 2  # tiles of at most 4 rows
    # Lane sums merged across rows where decode's tile rows are a power of two; every extend.
    assert schedules.default_config("decode", llama, info)["qk_row_merge"] == 1
    assert schedules.default_config("decode", qwen, info)["qk_row_merge"] == 1  # 7 rows padded to 8
    assert schedules.default_config("extend", qwen, info)["qk_row_merge"] == 1


def test_cpu_prefetch_distance_default_and_results():
    from pgen.target import parse_targets

    info = parse_targets("llvm")[0].info
    rule = CpuDecode()
    llama = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
    # About 128 KiB of blocks ahead (all KV heads of a block in one task), at most 4.
    assert rule.default(pgen.AttentionSpec(**llama, dtype="float32"), info)["prefetch_ahead"] == 1
    assert rule.default(pgen.AttentionSpec(**llama, dtype="float16"), info)["prefetch_ahead"] == 2
    qwen = pgen.AttentionSpec(num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16")
    assert rule.default(qwen, info)["prefetch_ahead"] == 4
    # P·V's requests for the next head's rows go into L1 by default (the next block's into L2).
    assert rule.default(qwen, info)["prefetch_head_locality"] == 3
    assert rule.default(qwen, info)["prefetch_locality"] == 2
    # Extend's one-token rows (the engine's CPU decode steps) make the same requests by default.
    extend = schedules.default_config("extend", qwen, info)
    assert (extend["prefetch_head_locality"], extend["prefetch_next_head"], extend["touch_v"]) == (3, 2, 1)
    # Farther than a short sequence's blocks reach: the requests stop at the task's range; the
    # next head's rows into L2.
    spec = ALL[0].values[0]
    kernels = pgen.build_kernels(spec, overrides={"decode": {"prefetch_ahead": 8, "prefetch_head_locality": 2},
                                                  "extend": {"prefetch_ahead": 8}})
    _assert_decode_and_extend_match_the_reference(spec, kernels, seed=7)


def test_cuda_decode_tensor_core_knobs():
    from pgen.schedules import default_config
    from pgen.schedules.cuda_decode_mma import CudaDecodeMma
    from pgen.schedules.cuda_decode_simt import CudaDecodeSimt
    from pgen.target import parse_targets
    from pgen.tune import candidates

    target = parse_targets("cuda:sm_80,sm_90")[0]
    info = target.info
    rule = CudaDecodeMma()
    llama = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")
    bf16 = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
    phi = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=32, head_dim=96, block_size=16, dtype="float16")
    # mma.sync takes 16-bit operands of one type, 16 query rows and head_dim in 32-element loads;
    # more than 128 would spill the accumulators.
    for spec in (pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float32"),
                 pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float32",
                                    kv_dtype="float16"),
                 pgen.AttentionSpec(num_q_heads=16, num_kv_heads=8, head_dim=256, block_size=16, dtype="float16"),
                 pgen.AttentionSpec(num_q_heads=32, num_kv_heads=1, head_dim=128, block_size=16, dtype="float16"),
                 pgen.AttentionSpec(num_q_heads=8, num_kv_heads=8, head_dim=40, block_size=16, dtype="float16")):
        assert "tensor-core decode needs" in rule.supports(spec, info), spec.uri
        assert default_config("decode", spec, info)["rule"] == "CudaDecodeSimt"
    for spec in (llama, bf16, phi):
        default = default_config("decode", spec, info)
        assert (default["rule"], default["mma_warps"]) == ("CudaDecodeMma", 4) and rule.check(spec, info, default) is None
    mma = rule.default(llama, info)
    # The split cap is the one knob both kernels have: no config of one family duplicates another's.
    assert {k.name for k in rule.knobs(llama, info)} & {k.name for k in CudaDecodeSimt().knobs(llama, info)} == {"max_splits"}
    assert rule.check(llama, info, {**mma, "max_splits": 8}) is None
    assert mma["mma_prefetch"] == 1 and rule.check(llama, info, {**mma, "mma_prefetch": 0}) is None
    sm75 = parse_targets("cuda:sm_75")[0].info
    assert "sm_80" in rule.supports(llama, sm75) and default_config("decode", llama, sm75)["rule"] == "CudaDecodeSimt"
    # A tuning sample holds tensor-core and CUDA-core configs side by side.
    space = list(rule.space(llama, info))
    assert len(space) == 4 * 5 * 2  # mma_warps x max_splits x mma_prefetch
    sample = candidates(llama, target, "decode", 24)
    # Tuning times one large batch, which never reaches the split cap: it keeps the default.
    assert {c["max_splits"] for c in sample} == {32}
    # Every tensor-core config (4 warp counts x mma_prefetch) beside CUDA-core ones.
    assert sum(1 for c in sample if c["rule"] == "CudaDecodeMma") == 8
    assert sum(1 for c in sample if c["rule"] == "CudaDecodeSimt") == 16


def test_cuda_extend_tensor_core_knobs_and_plan():
    from pgen.schedules import default_config
    from pgen.schedules.cuda_extend_mma import CudaExtendMma, shared_bytes
    from pgen.schedules.cuda_extend_simt import CudaExtendSimt
    from pgen.target import parse_targets
    from pgen.tune import candidates
    from pgen_runtime.kernels import extend_q_tiles

    target = parse_targets("cuda:sm_80,sm_90")[0]
    info = target.info
    rule = CudaExtendMma()
    llama = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16")
    fp32 = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float32")
    mixed = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float32",
                               kv_dtype="float16")
    assert rule.supports(llama, info) is None
    for spec in (fp32, mixed):  # wmma needs one 16-bit type for both operands
        assert "one 16-bit dtype" in rule.supports(spec, info)
    # The tensor-core kernel is the default wherever it applies, with tiles that fit the target.
    mma = default_config("extend", llama, info)
    assert mma == {"rule": "CudaExtendMma", "q_tile": 16, "mma_keys": 32, "mma_o": 1}
    assert default_config("extend", fp32, info)["rule"] == default_config("extend", mixed, info)["rule"] == "CudaExtendSimt"
    default = CudaExtendSimt().default(llama, info)
    assert rule.check(llama, info, mma) is None
    shared_o = {**mma, "mma_o": 0}  # the output tile in shared memory, not in accumulators
    assert "opt-in limit" in rule.check(llama, info, {**shared_o, "q_tile": 32})  # 198 KiB of shared memory
    assert rule.check(llama, info, {**mma, "q_tile": 32}) is None  # 128 KiB
    assert shared_bytes(llama, shared_o) > 99 * 1024 > shared_bytes(llama, mma)
    sm86 = parse_targets("cuda:sm_86")[0].info  # 99 KiB per block on the consumer archs
    assert "opt-in limit" in rule.check(llama, sm86, shared_o)
    assert rule.check(llama, sm86, rule.default(llama, sm86)) is None
    # Accumulators in registers: head_dim <= 128, and the sm_80+ fragment layout.
    gemma = pgen.AttentionSpec(num_q_heads=16, num_kv_heads=8, head_dim=256, block_size=16, dtype="float16")
    assert "head_dim <= 128" in rule.check(gemma, info, {**rule.default(gemma, info), "mma_o": 1})
    sm75 = parse_targets("cuda:sm_75")[0].info
    assert "sm_80" in rule.check(llama, sm75, mma) and rule.check(llama, sm75, shared_o) is None
    bf16 = pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
    assert "bfloat16" in rule.supports(bf16, sm75)
    # A tuning sample holds every tensor-core config beside CUDA-core ones.
    space = list(rule.space(llama, info))
    sample = candidates(llama, target, "extend", 24)
    assert all(c in sample for c in space) and len(space) == 9
    assert sum(1 for c in sample if c["rule"] == "CudaExtendSimt") >= 24 - len(space)
    # The launch plan counts query tiles of `q_tile` tokens, in either kernel.
    assert extend_q_tiles(mma, np.array([100, 1]), "cuda") == 7
    assert extend_q_tiles(default, np.array([100, 1]), "cuda") == 25


@pytest.mark.parametrize("spec", [
    pytest.param(pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16"), id="f16"),
    pytest.param(pgen.AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="float16",
                                    kv_dtype="int8"), id="int8")])
def test_all_six_kernels_address_pools_of_more_than_2_31_elements(spec):
    # A server's KV pool easily holds more than 2^31 elements (4 GiB of fp16, 2 GiB of int8): the
    # kernels index it in int64 (with int32 offsets these blocks were out of bounds: a segfault).
    # The case's blocks move past element 2^31 of a pool that is mostly never touched.
    kernels = pgen.build_kernels(spec)
    case = reference.paged_case(spec, [37, 300, 1], [1, 17, 1], seed=11)
    small = case["pool"]
    base = (1 << 31) // int(np.prod(spec.pool_shape(1)))
    big = kernels.new_pool(base + len(small))
    assert big.size > 1 << 31 and (base + 1) * big[0].size >= 1 << 31
    big[0] = small[0]
    big[base + 1:] = small[1:]

    def moved(ids):
        return np.where(ids == 0, 0, ids + base).astype(np.int32)

    want = reference.expected(spec, case)
    tables, lens = moved(case["block_tables"]), case["seq_lens"]
    out = np.full_like(case["q_decode"], np.nan)
    kernels.decode(case["q_decode"], big, tables, lens, out)
    reference.assert_attention_close(spec, out, want["decode"], "decode", want["decode_allowance"])
    out = np.full_like(case["q_extend"], np.nan)
    kernels.extend(case["q_extend"], big, tables, case["q_indptr"], lens, out)
    reference.assert_attention_close(spec, out, want["extend"], "extend", want["extend_allowance"])

    slots = np.where(case["slot_mapping"] < 0, -1, case["slot_mapping"] + base * spec.block_size).astype(np.int32)
    kernels.cache_write(case["k"], case["v"], big, slots)
    reference.assert_same_bytes(big[base + 1:], want["cache_write"][1:], "cache_write")
    big[base + 1:] = small[1:]
    kernels.copy_blocks(big, moved(case["pairs"]))
    reference.assert_same_bytes(big[base + 1:], want["copy_blocks"][1:], "copy_blocks")
    big[base + 1:] = small[1:]
    ids = moved(case["swap_ids"])
    buf = np.zeros((len(ids), *big.shape[1:]), big.dtype)
    kernels.swap_out(big, ids, buf)
    reference.assert_same_bytes(buf, want["swap_out"], "swap_out")
    big[ids] = 0
    kernels.swap_in(buf, ids, big)
    reference.assert_same_bytes(big[base + 1:], small[1:], "swap_in")
    reference.assert_same_bytes(big[0], small[0], "the null block")
