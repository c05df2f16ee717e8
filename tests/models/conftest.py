"""Model fixtures: each (family, export variant) is exported, compiled and its reference run once."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from builders import EOS_TOKEN_ID, MAX_TOKENS, export, prompts  # noqa: E402
from pgen_runtime.verify import ort_generate  # noqa: E402

@functools.cache
def _built(family: str, variant: str, root: str, kv_dtype: str | None = None) -> tuple[Path, Path]:
    from pgen.onnx import compile_model

    folder = Path(root)
    onnx_path = export(family, variant, folder / f"{family}-{variant}.onnx")
    suffix = f"-{kv_dtype}" if kv_dtype else ""
    package = compile_model(onnx_path, folder / f"{family}-{variant}{suffix}.pgenpkg", kv_dtype=kv_dtype,
                            progress=lambda line: None)
    return onnx_path, package


@functools.cache
def _reference(onnx_path: Path) -> list[tuple[list[int], list[np.ndarray]]]:
    return [(r.tokens, r.logits) for r in (ort_generate(onnx_path, p, MAX_TOKENS, EOS_TOKEN_ID) for p in prompts())]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture
def built(models_dir):
    """built(family, variant[, kv_dtype]) -> (onnx path, package path, onnxruntime reference per prompt)."""

    def get(family: str, variant: str, kv_dtype: str | None = None):
        onnx_path, package = _built(family, variant, models_dir, kv_dtype)
        return onnx_path, package, _reference(onnx_path)

    return get
