"""The paged model against onnxruntime on the original export: tokens equal, logits close.

Every family x export variant runs the same six prompts (four lengths, two sharing a prefix)
batched, in four settings: a roomy pool, small prefill chunks, and a pool so small that sequences
are preempted by swap or by recompute.
"""

from __future__ import annotations

import numpy as np
import pytest

from builders import FAMILIES, VARIANTS
from builders import MAX_TOKENS, prompts
from pgen_runtime import LLM, SamplingParams

SETTINGS = {
    "roomy": dict(),
    "chunked": dict(max_num_batched_tokens=16),
    "swap": dict(num_blocks=12, preemption_mode="swap", max_num_batched_tokens=32),
    "recompute": dict(num_blocks=12, preemption_mode="recompute", max_num_batched_tokens=32),
}
# What each setting must have exercised, from KVCacheManager.metrics(). NOTE: prefix hits are looked
# up when a sequence is admitted, over its first chunk, so 16-token chunks of these prompts hit nothing.
EXERCISED = {"roomy": "prefix_hits", "chunked": None, "swap": "swaps_out", "recompute": "recomputes"}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_onnxruntime(built, family, variant, setting):
    _, package, reference = built(family, variant)
    llm = LLM(package, **SETTINGS[setting])
    outputs = llm.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS, return_logits=True))
    for i, (out, (tokens, logits)) in enumerate(zip(outputs, reference)):
        assert out.token_ids == tokens, f"prompt {i} ({len(out.prompt_token_ids)} tokens) diverged"
        np.testing.assert_allclose(np.stack(out.logits), np.stack(logits), rtol=1e-4, atol=1e-4)
    metrics = llm.manager.metrics()
    if EXERCISED[setting]:
        assert getattr(metrics, EXERCISED[setting]) > 0, metrics
    assert metrics.blocks_used == 0, "finished sequences must release every block"


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_a_quantized_kv_cache_serves_the_same_tokens_in_every_setting(built, kv_dtype):
    # Codes and scales are per cached row, so chunking, swapping (which moves the scale rows with
    # their block) and recomputing (which quantizes the same values again) must not change a token.
    # Against onnxruntime's float cache only the logits are compared: a random-weight model's
    # near-tied tokens part after a few steps with any rounding. verify's KV_TOLERANCE is the bound.
    from pgen_runtime.verify import KV_TOLERANCE

    _, package, reference = built("llama", "dynamo18", kv_dtype)
    runs = {}
    for setting in SETTINGS:
        llm = LLM(package, **SETTINGS[setting])
        runs[setting] = llm.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS, return_logits=True))
        if EXERCISED[setting]:
            assert getattr(llm.manager.metrics(), EXERCISED[setting]) > 0
        assert llm.manager.metrics().blocks_used == 0
    for setting, outputs in runs.items():
        assert [o.token_ids for o in outputs] == [o.token_ids for o in runs["roomy"]], setting
    for out, (tokens, logits) in zip(runs["roomy"], reference):
        first = np.abs(out.logits[0] - logits[0]).max() / max(1.0, np.abs(logits[0]).max())
        assert first <= KV_TOLERANCE[kv_dtype], first


def test_compile_model_names_an_unknown_kv_dtype(built, tmp_path):
    from pgen.onnx import compile_model
    from pgen_runtime import SpecError

    onnx_path, _, _ = built("llama", "dynamo18")
    with pytest.raises(SpecError, match="kv_dtype='int4' is not supported; use one of .*int8, fp8_e4m3"):
        compile_model(onnx_path, tmp_path / "x.pgenpkg", kv_dtype="int4")
    assert not (tmp_path / "x.pgenpkg").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_split_over_the_kv_match_onnxruntime(built, family, monkeypatch):
    # The runtime splits a step's attention over the KV when it has fewer query tiles than threads
    # (a decode step of a few sequences); here with many threads and splits of at least 8 keys, so
    # these short prompts' steps split up to max_splits, prefill chunks too.
    import pgen_runtime.kernels

    monkeypatch.setitem(pgen_runtime.kernels.MIN_KEYS_PER_SPLIT, "cpu", 8)
    _, package, reference = built(family, VARIANTS[0])
    llm = LLM(package, max_num_batched_tokens=32)
    llm.engine.model.kernels.parallelism = 256
    outputs = llm.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS, return_logits=True))
    for i, (out, (tokens, logits)) in enumerate(zip(outputs, reference)):
        assert out.token_ids == tokens, f"prompt {i} ({len(out.prompt_token_ids)} tokens) diverged"
        np.testing.assert_allclose(np.stack(out.logits), np.stack(logits), rtol=1e-4, atol=1e-4)
    assert max(llm.engine.model._splits) == llm.engine.model.kernels.configs["extend"]["max_splits"] > 1


def test_eos_stops_and_sampling_is_seeded(built):
    _, package, reference = built("llama", "dynamo18")
    llm = LLM(package)
    greedy = llm.generate(prompts()[:2], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [o.token_ids for o in greedy] == [t[:4] for t, _ in reference[:2]]
    assert all(o.finish_reason == "length" for o in greedy)
    sample = SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    first, second = (LLM(package).generate(prompts()[:2], sample) for _ in range(2))
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
