"""Engine fixtures: the default tiny model and a tiny-vocabulary one, each exported and compiled once."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pgen.tiny import TinyConfig, export  # noqa: E402

# Eight ids (EOS among them): beam search over every continuation stays enumerable.
BEAM_CONFIG = TinyConfig(vocab=8, hidden=64, layers=1, q_heads=2, kv_heads=1, head_dim=32, ffn=128, seed=1)


@functools.cache
def build_tiny(config: TinyConfig, root: str) -> tuple[Path, Path]:
    """(onnx path, package path) of a tiny model, built once per session."""
    from pgen.onnx import compile_model

    onnx_path = export(Path(root) / f"{config.name}.onnx", config)
    return onnx_path, compile_model(onnx_path, Path(root) / f"{config.name}.pgenpkg", progress=lambda line: None)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny(TinyConfig(), str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def beam_model(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny(BEAM_CONFIG, str(tmp_path_factory.getbasetemp()))
