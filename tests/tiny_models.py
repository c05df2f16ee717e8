"""`pgen.tiny` models for the engine and server tests, each exported and compiled once per session."""

from __future__ import annotations

import functools
from pathlib import Path

from pgen.tiny import TinyConfig, export

# Eight ids (EOS among them): beam search over every continuation stays enumerable.
BEAM_CONFIG = TinyConfig(vocab=8, hidden=64, layers=1, q_heads=2, kv_heads=1, head_dim=32, ffn=128, seed=1)


@functools.cache
def build_tiny(config: TinyConfig, root: str) -> tuple[Path, Path]:
    """(onnx path, package path) of a tiny model under `root`."""
    from pgen.onnx import compile_model

    onnx_path = export(Path(root) / f"{config.name}.onnx", config)
    return onnx_path, compile_model(onnx_path, Path(root) / f"{config.name}.pgenpkg", progress=lambda line: None)
