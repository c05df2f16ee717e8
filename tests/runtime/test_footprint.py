"""The footprint test: a package runs in a fresh venv holding only the runtime's declared dependencies.

The venv gets numpy, apache-tvm-ffi and pgen_runtime (from runtime/pyproject.toml) from PyPI and the
checkout: no apache-tvm, no torch, no pgen. The reference is computed here and the inputs travel as
a .npz file. Needs PyPI (pip's cache makes a repeat fast).
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest
import reference

from pgen import AttentionSpec
from pgen.package import package

REPO = Path(__file__).resolve().parents[2]
SPEC = AttentionSpec(num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16")  # Qwen2.5-0.5B


def _size(paths) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip install {args} failed (PyPI reachable?):\n{proc.stderr[-3000:]}"


def _site(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout
    return Path(out.strip())


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> tuple[Path, set[str]]:
    """A venv with the runtime and exactly the dependencies runtime/pyproject.toml declares.

    Returns:
        (its python, what site-packages held before the install: pip and the venv's seed).
    """
    root = tmp_path_factory.mktemp("footprint")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    seed = {p.name for p in _site(python).iterdir()}
    deps = tomllib.loads((REPO / "runtime" / "pyproject.toml").read_text())["project"]["dependencies"]
    # A copy, so pip's in-tree build leaves no build/ or egg-info in the checkout.
    source = shutil.copytree(REPO / "runtime", root / "runtime", ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                                              "*.egg-info"))
    _pip(python, *deps, str(source))
    return python, seed


def test_runtime_venv_has_no_compiler_and_runs_a_package(runtime_venv, tmp_path):
    python, seed = runtime_venv
    probe = "import importlib.util as u; print([m for m in ('tvm', 'torch', 'pgen', 'jinja2') if u.find_spec(m)])"
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert found.strip() == "[]", f"the runtime venv can import {found}"
    site = _site(python)

    pkg = package(SPEC, "llvm", tmp_path / "qwen.pgenpkg", progress=lambda line: None)
    case = reference.paged_case(SPEC, [1, 15, 17, 2100], [1, 15, 2, 67], seed=5)
    got, runtime_file = reference.run_package_in(str(python), pkg, case, tmp_path)
    assert Path(runtime_file).is_relative_to(site), runtime_file
    reference.assert_kernels_match(SPEC, got, reference.expected(SPEC, case))

    installed = [p for p in site.iterdir() if p.name not in seed]
    numpy = [p for p in installed if p.name.split("-")[0] in ("numpy", "numpy.libs")]
    rest = [p for p in installed if p not in numpy]
    mb = _size(rest) / 2**20
    print(f"\nruntime venv: {mb:.1f} MiB installed beyond numpy ({_size(numpy) / 2**20:.1f} MiB) and the venv's "
          f"own pip/setuptools; the package is {_size([pkg]) / 2**20:.1f} MiB")
    for p in sorted(rest, key=lambda p: -_size([p])):
        print(f"  {_size([p]) / 2**20:7.2f} MiB  {p.name}")
    assert mb <= 25, f"the runtime needs {mb:.1f} MiB beyond numpy; the goal is <= 25 MiB"
