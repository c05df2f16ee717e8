"""Memory safety of compiled models: bounds-checked builds under fuzzed steps, unaligned inputs.

A bounds-checked package (`compile_model(..., bounds_checks=True)`) raises, naming the buffer and
the index, where a normal build would read or write out of bounds; the fuzz runs the engine over
random batch compositions on it, so an out-of-bounds access fails the test instead of passing
silently on one host and crashing on another.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import pytest

from models.builders import export as export_family
from pgen.tiny import TinyConfig, export
from pgen_runtime import LLM, SamplingParams, ShapeError
from pgen_runtime.model import PagedModel, StepInputs


@functools.cache
def _checked(kind: str, root: str) -> Path:
    from pgen.onnx import compile_model

    folder = Path(root)
    if kind == "tiny":
        onnx_path = export(folder / "tiny-checked.onnx", TinyConfig())
    else:
        family, variant = kind.split("-")
        onnx_path = export_family(family, variant, folder / f"{kind}-checked.onnx")
    return compile_model(onnx_path, folder / f"{kind}-checked.pgenpkg", bounds_checks=True,
                         progress=lambda line: None)


def _fuzz_requests(rng: random.Random, vocab: int, max_prompt: int):
    """1-64 requests of 1-max_prompt tokens: greedy, parallel samples and beams mixed."""
    prompts, params = [], []
    for _ in range(rng.randint(1, 64)):
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.randint(1, max_prompt))])
        kind = rng.random()
        max_tokens = rng.randint(1, 12)
        if kind < 0.6:
            params.append(SamplingParams(max_tokens=max_tokens, ignore_eos=rng.random() < 0.5))
        elif kind < 0.9:
            params.append(SamplingParams(n=rng.randint(2, 4), temperature=1.0, seed=rng.randrange(99),
                                         max_tokens=max_tokens))
        else:
            params.append(SamplingParams(n=2, beam_width=rng.randint(2, 3), max_tokens=min(max_tokens, 4)))
    return prompts, params


def _engine_args(rng: random.Random) -> dict:
    """A pool from tight (preemption by swap or recompute) to roomy, and chunked prefill."""
    return dict(num_blocks=rng.choice([None, 48, 96]), max_num_batched_tokens=rng.choice([16, 64, 512]),
                max_num_seqs=rng.choice([8, 64, 256]), preemption_mode=rng.choice([None, "swap", "recompute"]))


def _run_fuzz(package: Path, seeds: range, max_prompt: int) -> None:
    for seed in seeds:
        rng = random.Random(seed)
        llm = LLM(package, **_engine_args(rng))
        capacity = llm.engine.max_model_len
        prompts, params = _fuzz_requests(rng, llm.model.vocab_size, min(max_prompt, capacity // 2))
        outputs = llm.generate(prompts, params)
        assert all(o.finished for o in outputs), f"seed {seed}"
        assert llm.manager.metrics().blocks_used == 0, f"seed {seed}: blocks leaked"


def _bad_step() -> StepInputs:
    """Two tokens of one sequence whose block table names block 9 of a 4-block pool."""
    return StepInputs(np.array([5, 6], np.int64), np.array([0, 1], np.int64), np.array([[9]], np.int32),
                      np.array([16, 17], np.int32), np.array([0, 2], np.int32), np.array([2], np.int32))


def test_model_refuses_a_step_past_its_pool(tiny):
    model = PagedModel(tiny[1], num_blocks=4)
    with pytest.raises(ShapeError, match="block_tables holds block id 9"):
        model.forward(_bad_step())
    for field, value, match in [("input_ids", [5, 400], "input_ids holds 400"),
                                ("positions", [0, -1], "positions holds -1"),
                                ("slot_mapping", [16, 64], "slot_mapping holds 64")]:
        step = _bad_step()
        step.block_tables[0, 0] = 1
        setattr(step, field, np.array(value, getattr(step, field).dtype))
        with pytest.raises(ShapeError, match=match):
            model.forward(step)


def test_bounds_checked_build_raises_where_it_would_read_out_of_bounds(tmp_path_factory):
    """The check is live: the same step, past the runtime's checks, raises in the kernel that
    would read block 9, naming it and the pool."""
    model = PagedModel(_checked("tiny", str(tmp_path_factory.getbasetemp())), num_blocks=4)
    step = _bad_step()
    args = [step.input_ids, step.positions, *model.pools, step.block_tables, step.slot_mapping, step.q_indptr,
            step.seq_lens, step.logits_indices, np.zeros(1, np.int32)]
    with pytest.raises(Exception, match=r"pgen bounds check: pgen_extend accesses kv_pool\["):
        model._main(*args)


def test_fuzzed_batches_stay_in_bounds_tiny(tmp_path_factory):
    _run_fuzz(_checked("tiny", str(tmp_path_factory.getbasetemp())), range(8), max_prompt=300)


@pytest.mark.parametrize("kind", ["llama-dynamo18", "llama-torchscript", "gpt2-dynamo18", "llama-dynamo23"])
def test_fuzzed_batches_stay_in_bounds_exports(tmp_path_factory, kind):
    _run_fuzz(_checked(kind, str(tmp_path_factory.getbasetemp())), range(10, 12), max_prompt=200)


def _misaligned(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `a` whose data starts `offset` bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 64 + offset, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_model_takes_element_aligned_inputs(tiny):
    """numpy arrays are only 16-byte aligned; the model must not assume TVM's 64 (aligned vector
    loads faulted on AVX2 hosts at the first batched step)."""
    model = PagedModel(tiny[1], num_blocks=16)
    lens = [3, 5, 2, 7]
    tables = np.arange(1, 1 + len(lens), dtype=np.int32)[:, None]
    slots = np.concatenate([tables[b, 0] * 16 + np.arange(n) for b, n in enumerate(lens)]).astype(np.int32)
    step = StepInputs(np.arange(10, 10 + sum(lens), dtype=np.int64),
                      np.concatenate([np.arange(n) for n in lens]).astype(np.int64), tables, slots,
                      np.concatenate([[0], np.cumsum(lens)]).astype(np.int32), np.array(lens, np.int32))
    expected = model.forward(StepInputs(*(_misaligned(a, 0) for a in _fields(step))))
    for offset in (4, 8, 16, 24):
        got = model.forward(StepInputs(*(_misaligned(a, offset) for a in _fields(step))))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _fields(step: StepInputs) -> list[np.ndarray]:
    return [step.input_ids, step.positions, step.block_tables, step.slot_mapping, step.q_indptr, step.seq_lens]
