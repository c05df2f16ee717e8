"""Engine fixtures: the default tiny model and a tiny-vocabulary one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pgen.tiny import TinyConfig  # noqa: E402
from tiny_models import BEAM_CONFIG, build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny(TinyConfig(), str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def beam_model(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny(BEAM_CONFIG, str(tmp_path_factory.getbasetemp()))
