"""Test setup shared by every folder: `import reference`, one kernel build per spec, skips."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

# NOTE: builds go to the user's cache ($PGEN_CACHE_DIR or ~/.cache/pgen). The cache is keyed by a
# hash of spec, target, schedule knobs, generator sources and versions, so reusing it is safe and
# is what makes a warm run fast. Tests of the cache itself point PGEN_CACHE_DIR at a tmp folder.


@functools.lru_cache(maxsize=None)
def _build(spec, target: str = "llvm"):
    import pgen

    return pgen.build_kernels(spec, target=target)


@pytest.fixture(scope="session")
def build_kernels():
    """`build_kernels(spec)`: the loaded CPU kernels of `spec`, built (or loaded) once per session."""
    return _build


@pytest.fixture(scope="session")
def cuda_toolchain():
    """Skips the test where nvcc (or the rest of the CUDA build toolchain) is absent."""
    from pgen import BuildError, cuda

    try:
        cuda.ensure_cuda_build_env()
    except BuildError as err:
        pytest.skip(f"no CUDA build toolchain: {err}")
