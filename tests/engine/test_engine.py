"""The engine end to end on the tiny model: greedy vs onnxruntime, sharing, beams, seeds, stops."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_reference import beam_search, brute_force_best
from pgen_runtime.verify import ort_generate
from pgen.tiny import EOS_TOKEN_ID
from pgen_runtime import (ByteTokenizer, ConfigError, Engine, HFTokenizer, LLM, SamplingParams, ShapeError,
                          load_tokenizer)
from pgen_runtime.async_engine import AsyncEngine
from pgen_runtime.tokenizer import IncrementalDecoder
from tiny_models import BEAM_CONFIG

PROMPTS = ["The paged KV cache holds keys and values in blocks.", "Hi", "x" * 40]


def test_greedy_matches_onnxruntime(tiny):
    onnx_path, package = tiny
    llm = LLM(package, max_num_batched_tokens=32)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=24))
    for out, prompt in zip(outputs, ids):
        tokens = ort_generate(onnx_path, prompt, 24, EOS_TOKEN_ID).tokens
        assert out.token_ids == tokens
        assert out.text == llm.tokenizer.decode(tokens)
        assert out.finish_reason == ("stop" if tokens[-1] == EOS_TOKEN_ID else "length")
    assert llm.manager.metrics().blocks_used == 0


def test_parallel_samples_share_the_prompt_blocks(tiny):
    engine = Engine(tiny[1])
    prompt = list(range(10, 50))  # 40 tokens: 2 full blocks and a partly filled third
    out = engine.add_request(prompt, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=6, ignore_eos=True))
    engine.step()  # prefill, then 4 samples from its logits
    metrics = engine.manager.metrics()
    assert len(engine.scheduler.running) == 4
    assert metrics.blocks_used == 3, "the 4 samples must hold the prompt's 3 blocks together"
    engine.step()  # each writes its first token: the shared partial block is copied 3 times
    metrics = engine.manager.metrics()
    assert metrics.cow_copies == 3 and metrics.blocks_used == 2 + 4
    while engine.has_unfinished:
        engine.step()
    assert engine.stats.peak_blocks_shared == 3 and engine.stats.peak_table_entries == 12
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "samples at temperature 1 should differ"
    assert engine.manager.metrics().blocks_used == 0


@pytest.mark.parametrize("setting", [dict(), dict(num_blocks=10, preemption_mode="swap"),
                                     dict(num_blocks=10, preemption_mode="recompute")])
def test_seeded_sampling_repeats_across_batches_and_preemption(tiny, setting):
    params = SamplingParams(n=3, temperature=0.9, top_k=40, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)
    alone = LLM(tiny[1]).generate([PROMPTS[0]], params)[0]
    llm = LLM(tiny[1], max_num_batched_tokens=32, **setting)
    crowded = llm.generate(PROMPTS, [params, SamplingParams(n=2, temperature=1.0, max_tokens=20, seed=11), params])
    assert [c.token_ids for c in crowded[0].outputs] == [c.token_ids for c in alone.outputs]
    assert [c.token_ids for c in crowded[2].outputs] != [c.token_ids for c in alone.outputs]
    if setting:
        metrics = llm.manager.metrics()
        assert metrics.swaps_out + metrics.recomputes > 0, metrics
    other_seed = LLM(tiny[1]).generate([PROMPTS[0]], SamplingParams(**{**_fields(params), "seed": 8}))[0]
    assert [c.token_ids for c in other_seed.outputs] != [c.token_ids for c in alone.outputs]


def _fields(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in params.__slots__}


def test_top_k_1_and_tiny_top_p_are_greedy(tiny):
    llm = LLM(tiny[1])
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12))
    for params in (SamplingParams(temperature=1.5, top_k=1, max_tokens=12, seed=1),
                   SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=12, seed=1)):
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [o.token_ids for o in greedy]


def test_stop_token_ids_and_stop_strings(tiny):
    llm = LLM(tiny[1])
    full = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    stop_id = full.token_ids[8]
    first = full.token_ids.index(stop_id)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == full.token_ids[:first + 1] and out.finish_reason == "stop"
    stop = full.text[10:13]
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop, "never"]))[0]
    assert out.text == full.text[:full.text.index(stop)] and out.finish_reason == "stop"
    assert llm.manager.metrics().blocks_used == 0


def test_beam_search_is_exhaustive_when_wide_enough(beam_model):
    onnx_path, package = beam_model
    prompt, length, vocab = [3, 4, 5, 6, 7, 3], 3, BEAM_CONFIG.vocab
    width = vocab ** (length - 1)  # keeps every prefix: the search is exact
    params = SamplingParams(n=5, beam_width=width, max_tokens=length, ignore_eos=True)
    out = LLM(package).generate([prompt], params)[0]
    best = brute_force_best(onnx_path, prompt, length, vocab, 5)
    assert [c.token_ids for c in out.outputs] == [tokens for _, tokens in best]
    np.testing.assert_allclose([c.cumulative_logprob for c in out.outputs], [s for s, _ in best], atol=1e-4)


@pytest.mark.parametrize("width", [2, 3])
def test_beam_search_matches_reference_and_shares_blocks(beam_model, width):
    onnx_path, package = beam_model
    prompt = [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4, 5, 6]  # 19: beams fork a partial block
    engine = Engine(package)
    out = engine.add_request(prompt, SamplingParams(n=2, beam_width=width, max_tokens=8))
    while engine.has_unfinished:
        engine.step()
    expected = beam_search(onnx_path, prompt, width, 8, 2, EOS_TOKEN_ID)
    assert [(c.token_ids, c.finish_reason) for c in out.outputs] == [(t, r) for _, t, r in expected]
    np.testing.assert_allclose([c.cumulative_logprob for c in out.outputs], [s for s, _, _ in expected], atol=1e-4)
    assert engine.stats.peak_blocks_shared >= 1 and engine.manager.metrics().cow_copies >= 1
    assert engine.manager.metrics().blocks_used == 0


def test_invalid_requests_raise_before_anything_runs(tiny):
    engine = Engine(tiny[1], num_blocks=9)  # 8 usable blocks: 128 tokens
    with pytest.raises(ShapeError, match="max_model_len"):
        engine.add_request("y" * 120, SamplingParams(max_tokens=16))
    with pytest.raises(ShapeError, match="empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(ShapeError, match="vocabulary"):
        engine.add_request([1, 999], SamplingParams())
    for bad in (dict(n=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_tokens=0),
                dict(n=3, beam_width=2), dict(stop=[""]), dict(seed=-1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert not engine.has_unfinished and engine.manager.metrics().blocks_used == 0


def test_abort_frees_blocks(tiny):
    engine = Engine(tiny[1])
    out = engine.add_request(PROMPTS[0], SamplingParams(n=2, temperature=1.0, max_tokens=50, seed=0, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort(out.request_id)
    assert out.finished and {c.finish_reason for c in out.outputs} == {"abort"}
    assert not engine.has_unfinished and engine.manager.metrics().blocks_used == 0


def test_async_engine_streams_what_generate_returns(tiny):
    expected = LLM(tiny[1]).generate(PROMPTS, SamplingParams(max_tokens=16))

    async def stream(engine: AsyncEngine, prompt: str) -> list:
        return [o async for o in engine.generate(prompt, SamplingParams(max_tokens=16))]

    async def main() -> list:
        engine = AsyncEngine(Engine(tiny[1]))
        engine.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(stream(engine, p) for p in PROMPTS)), 60)
        finally:
            engine.stop()

    for snapshots, want in zip(asyncio.run(main()), expected):
        assert snapshots[-1].finished and snapshots[-1].token_ids == want.token_ids
        texts = [s.text for s in snapshots]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "streamed text only grows"
        assert len(snapshots) > 1


def test_tokenizers(tmp_path):
    byte = ByteTokenizer(259)
    assert byte.decode(byte.encode("héllo")) == "héllo"
    with pytest.raises(ShapeError, match="byte"):
        ByteTokenizer(100).encode("z")
    assert isinstance(load_tokenizer(tmp_path, 259), ByteTokenizer)
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path, 3)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode("hello world") == [1, 2] and loaded.decode([1, 2]) == "hello world"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="aé€😀\n", max_size=4), max_size=12))
def test_incremental_decoder_agrees_with_whole_decodes(pieces):
    """Streamed text is always a prefix of the whole decode, and the final text equals it exactly,
    with UTF-8 characters split over byte tokens and invalid bytes (a lone continuation byte)."""
    tok = ByteTokenizer(259)
    ids = []
    for piece in pieces:
        ids += tok.encode(piece) if piece != "\n" else [0x80 + 3]
    decoder, whole = IncrementalDecoder(tok), tok.decode(ids)
    for n in range(1, len(ids) + 1):
        text = decoder.push(ids[:n])
        # Emitted text never changes later, and holds back at most one partial character.
        assert tok.decode(ids[:n]).startswith(text) and whole.startswith(text)
        assert len(tok.decode(ids[:n])) - len(text) <= 1
    assert decoder.final(ids) == whole


def test_incremental_decoder_with_a_merging_hf_tokenizer(tmp_path):
    """WordPiece merges `##` continuations into the previous word: the window decode handles it."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "##s": 3, "wide": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(tmp_path, 5)
    ids = [1, 2, 3, 4, 2, 3, 3]
    decoder = IncrementalDecoder(hf)
    for n in range(1, len(ids) + 1):
        assert hf.decode(ids[:n]).startswith(decoder.push(ids[:n]))
    assert decoder.final(ids) == hf.decode(ids) == "hello worlds wide worldss"


def _word_tokenizer(path, words: int):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(["[UNK]", "<s>", "</s>"])
    tok.save(str(path))
    return path


def test_compile_model_ships_a_hf_tokenizer(tiny, tmp_path):
    from pgen.onnx import compile_model
    from pgen_runtime.package import read_manifest

    tokenizer = _word_tokenizer(tmp_path / "tok.json", 200)
    package = compile_model(tiny[0], tmp_path / "worded.pgenpkg", tokenizer=tokenizer, progress=lambda line: None)
    _, manifest = read_manifest(package)
    assert manifest["model"]["tokenizer"] == "tokenizer.json" and "tokenizer.json" in manifest["files"]
    llm = LLM(package)
    assert isinstance(llm.tokenizer, HFTokenizer)
    out = llm.generate(["w1 w2 w3 w40"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.prompt_token_ids == [4, 5, 6, 43]
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


def test_compile_model_rejects_a_tokenizer_that_does_not_fit(tiny, tmp_path):
    from pgen.onnx import compile_model

    too_big = _word_tokenizer(tmp_path / "big.json", 400)  # 403 ids > the model's 259
    with pytest.raises(ConfigError, match="tokenizer=.*403 ids.*259"):
        compile_model(tiny[0], tmp_path / "a.pgenpkg", tokenizer=too_big, progress=lambda line: None)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable"):
        compile_model(tiny[0], tmp_path / "b.pgenpkg", tokenizer=garbage, progress=lambda line: None)
    assert not (tmp_path / "a.pgenpkg").exists() and not (tmp_path / "b.pgenpkg").exists()
