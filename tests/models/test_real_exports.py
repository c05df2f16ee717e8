"""Real exports of transformers models: compiled by `pgen compile-model`, greedy tokens equal to
onnxruntime's on the same file, alone and in a mixed batch.

Tiny random-weight models of each family (`hf_models.FAMILIES`: GQA, fused QKV, sliding windows,
soft-capping, learned positions, computed scales) exported with optimum and with torch dynamo, with
transformers' SDPA and eager attention, and the rotary families' dynamo exports at opset 23 (their
rotary as ONNX `RotaryEmbedding`: `OPSET23`). compile_model verifies the package against onnxruntime
itself (a mixed batch, prefill and decode) before writing it; these tests then run the package the
way users do, through `LLM`. The smoke subset runs every family from both exporters with SDPA (the
default) and the eager forms the rewrite handles differently (Gemma-2's soft-cap, GPT-2's Where
mask and computed scale, GPT-J's repeat_interleave rotary) and Qwen2 at opset 23; `-m full` runs
the whole grid, and the exports pgen refuses (`hf_models.REFUSED`) must fail with a
ModelImportError that says why.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

import hf_models  # noqa: E402
from pgen.onnx import compile_model  # noqa: E402
from pgen_runtime.verify import ort_generate  # noqa: E402
from pgen_runtime import LLM, SamplingParams  # noqa: E402

MAX_TOKENS = 12
# Past one 16-token block and past the 16-token window, one shorter than both, one of one token.
LENGTHS = (3, 21, 40, 1)
# The families whose dynamo export at opset 23 emits RotaryEmbedding (GPT-J's and Cohere's
# interleaved rotary stays elementwise ops, GPT-2 has none): exported at opset 23 too.
OPSET23 = ("llama", "qwen2", "mistral", "phi3", "gemma2")
SMOKE = {(f, e, "sdpa", 18) for f in hf_models.FAMILIES[:6] for e in hf_models.EXPORTERS} | \
    {("gemma2", "dynamo", "eager", 18), ("gpt2", "optimum", "eager", 18), ("gptj", "optimum", "eager", 18),
     ("cohere", "optimum", "sdpa", 18), ("qwen2", "dynamo", "sdpa", 23)}


def _exports(family: str):
    """The (exporter, opset) pairs `family` is exported with."""
    yield from ((exporter, 18) for exporter in hf_models.EXPORTERS)
    if family in OPSET23:
        yield "dynamo", 23


def _cases(refused: bool = False):
    for family in hf_models.FAMILIES:
        for exporter, opset in _exports(family):
            if ((family, exporter) in hf_models.REFUSED) != refused:
                continue
            for attn in hf_models.attentions(family):
                marks = () if (family, exporter, attn, opset) in SMOKE else pytest.mark.full
                suffix = "" if opset == 18 else f"-opset{opset}"
                yield pytest.param(family, exporter, attn, opset, id=f"{family}-{exporter}-{attn}{suffix}",
                                   marks=marks)


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(3, 256, n)] for n in LENGTHS]


@pytest.fixture(scope="session")
def exports_dir(request) -> str:
    """Exports persist in pytest's cache, keyed by the builder and the exporters' versions."""
    from importlib.metadata import version

    key = hashlib.sha256(Path(hf_models.__file__).read_bytes())
    key.update(" ".join(version(p) for p in ("torch", "transformers", "optimum", "optimum-onnx", "onnx")).encode())
    return str(request.config.cache.mkdir(f"hf-exports-{key.hexdigest()[:12]}"))


@functools.cache
def _compiled(family: str, exporter: str, attn: str, opset: int, root: str, out: str) -> tuple[Path, Path]:
    onnx_path = hf_models.export(family, exporter, attn, root, opset)
    # optimum writes the stop token into config.json beside the export; a dynamo export has none.
    eos = hf_models.EOS_TOKEN_ID if exporter == "dynamo" else None
    package = compile_model(onnx_path, Path(out) / f"{onnx_path.parent.name}.pgenpkg", eos_token_id=eos,
                            progress=lambda line: None)
    return onnx_path, package


@functools.cache
def _reference(onnx_path: Path) -> tuple:
    return tuple(ort_generate(onnx_path, p, MAX_TOKENS, hf_models.EOS_TOKEN_ID) for p in prompts())


@pytest.fixture(scope="session")
def packages_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-packages"))


@pytest.mark.parametrize("family, exporter, attn, opset", list(_cases()))
def test_greedy_tokens_match_onnxruntime(family, exporter, attn, opset, exports_dir, packages_dir):
    onnx_path, package = _compiled(family, exporter, attn, opset, exports_dir, packages_dir)
    reference = _reference(onnx_path)
    params = SamplingParams(max_tokens=MAX_TOKENS, return_logits=True)
    # Alone: one sequence per step. Batched: 16-token chunks, so prefill chunks of the long prompts
    # share steps with the short ones' decode steps.
    alone = LLM(package)
    runs = {"alone": [alone.generate([p], params)[0] for p in prompts()],
            "batched": LLM(package, max_num_batched_tokens=16).generate(prompts(), params)}
    for how, outputs in runs.items():
        for i, (out, ref) in enumerate(zip(outputs, reference)):
            assert out.token_ids == ref.tokens, f"{how}: prompt {i} ({LENGTHS[i]} tokens) diverged"
            scale = max(1.0, float(np.abs(np.stack(ref.logits)).max()))
            np.testing.assert_allclose(np.stack(out.logits), np.stack(ref.logits), rtol=0, atol=2e-3 * scale)


@pytest.mark.parametrize("family, exporter, attn, opset", list(_cases(refused=True)))
def test_exports_pgen_cannot_serve_are_refused_by_name(family, exporter, attn, opset, exports_dir, tmp_path):
    from pgen_runtime.errors import ModelImportError

    onnx_path = hf_models.export(family, exporter, attn, exports_dir, opset)
    with pytest.raises(ModelImportError, match=hf_models.REFUSED[family, exporter]):
        compile_model(onnx_path, tmp_path / "refused.pgenpkg", progress=lambda line: None)
    assert not (tmp_path / "refused.pgenpkg").exists()


def test_the_matrix_exercises_what_it_claims(exports_dir, packages_dir):
    # The windows and soft-caps the families configure reach the packages' specs (a dropped window
    # gives equal tokens on prompts shorter than it, which is why LENGTHS pass it), and the opset-23
    # export's rotary is ONNX RotaryEmbedding.
    import json

    import onnx

    def layers(family, exporter, attn):
        _, package = _compiled(family, exporter, attn, 18, exports_dir, packages_dir)
        return json.loads((package / "manifest.json").read_text())["model"]["layers"]

    assert {l["sliding_window"] for l in layers("mistral", "optimum", "sdpa")} == {hf_models.WINDOW}
    qwen2 = onnx.load(str(hf_models.export("qwen2", "dynamo", "sdpa", exports_dir, 23)))
    assert sum(n.op_type == "RotaryEmbedding" for n in qwen2.graph.node) == 4  # q and k of 2 layers
    gemma = layers("gemma2", "dynamo", "eager")
    assert [l["sliding_window"] for l in gemma] == [hf_models.WINDOW, None]  # local, global
    assert {l["logit_softcap"] for l in gemma} == {50.0}
    assert max(LENGTHS) > hf_models.WINDOW
