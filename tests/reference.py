"""Float64 NumPy references for every pgen kernel, and the random paged cases they are checked on."""

from __future__ import annotations

import inspect
import subprocess
from pathlib import Path

import numpy as np

from pgen.reference import *  # noqa: F401,F403
from pgen.reference import attend, cache_write, copy_blocks, decode, expected, extend, gather_kv, paged_case  # noqa: F401
from pgen_runtime.spec import AttentionSpec


def run_kernels(kernels, case: dict) -> dict:
    """Run all six kernels of `kernels` (a PagedKernels) on copies of `case`'s arrays.

    Outputs start as NaN so an element a kernel skips shows. swap_in scatters swap_out's buffer
    back into blocks that were zeroed meanwhile: the pool must come back byte for byte.
    """
    pool = case["pool"]
    got = {}
    out = np.full(case["q_decode"].shape, np.nan, case["q_decode"].dtype)
    kernels.decode(case["q_decode"], pool.copy(), case["block_tables"], case["seq_lens"], out)
    got["decode"] = out
    out = np.full(case["q_extend"].shape, np.nan, case["q_extend"].dtype)
    kernels.extend(case["q_extend"], pool.copy(), case["block_tables"], case["q_indptr"], case["seq_lens"], out)
    got["extend"] = out
    got["cache_write"] = pool.copy()
    kernels.cache_write(case["k"], case["v"], got["cache_write"], case["slot_mapping"])
    got["copy_blocks"] = pool.copy()
    kernels.copy_blocks(got["copy_blocks"], case["pairs"])
    ids = case["swap_ids"]
    got["swap_out"] = np.full((len(ids), *pool.shape[1:]), np.nan if pool.dtype.kind == "f" else 0x5A, pool.dtype)
    kernels.swap_out(pool, ids, got["swap_out"])
    got["swap_in"] = pool.copy()
    got["swap_in"][ids] = 0
    kernels.swap_in(got["swap_out"], ids, got["swap_in"])
    return got


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest error of any output row [.., D] relative to that row's largest reference value."""
    err = np.abs(got.astype(np.float64) - want).max(axis=-1)
    return float(np.max(err / np.abs(want).max(axis=-1)))


TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


def assert_attention_close(spec: AttentionSpec, got: np.ndarray, want: np.ndarray, what: str,
                           allowance: np.ndarray | None = None) -> None:
    """got within the dtype's tolerance of want, beyond `allowance` (per value: what an int8 cache's
    u8 P·V weights may add, reference.weight_rounding_allowance)."""
    assert not np.isnan(got).any(), f"{what}: NaN in the output ({np.isnan(got).sum()} values)"
    if allowance is not None:
        # Move got toward want by at most the allowance; what is left must be within tolerance.
        delta = got.astype(np.float64) - want
        got = want + np.sign(delta) * np.maximum(np.abs(delta) - allowance, 0.0)
    err = rel_error(got, want)
    assert err < TOLERANCE[spec.dtype], f"{what}: relative error {err:.3g} >= {TOLERANCE[spec.dtype]}"


def assert_same_bytes(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bit-exact equality, NaN payloads included."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    assert got.tobytes() == want.tobytes(), f"{what}: {np.sum(got.view(np.uint8) != want.view(np.uint8))} bytes differ"


def assert_kernels_match(spec: AttentionSpec, got: dict, want: dict) -> None:
    """Compare `run_kernels` output with `expected`: attention within tolerance, the rest exact."""
    for name in ("decode", "extend"):
        assert_attention_close(spec, got[name], want[name], name, want.get(f"{name}_allowance"))
    for name in ("cache_write", "copy_blocks", "swap_out", "swap_in"):
        assert_same_bytes(got[name], want[name], name)


def run_package_in(python: str, package, case: dict, folder) -> tuple[dict, str]:
    """Run `run_kernels` on a loaded package in a fresh interpreter that may lack pgen and tvm.

    The child gets `case` as a .npz file and the source of `run_kernels` itself, imports only
    numpy and pgen_runtime, and fails if tvm or pgen ended up imported.

    Returns:
        (the kernels' outputs, the path of the pgen_runtime the child imported).
    """
    folder = Path(folder)
    np.savez(folder / "case.npz", **case)
    script = "\n".join([
        "import sys",
        "import numpy as np",
        "import pgen_runtime",
        inspect.getsource(run_kernels),
        f"case = dict(np.load({str(folder / 'case.npz')!r}))",
        f"got = run_kernels(pgen_runtime.load_package({str(package)!r}), case)",
        f"np.savez({str(folder / 'got.npz')!r}, **got)",
        "imported = sorted(m for m in sys.modules if m.split('.')[0] in ('tvm', 'pgen'))",
        "assert not imported, imported",
        "print(pgen_runtime.__file__)",
    ])
    proc = subprocess.run([python, "-c", script], cwd=folder, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(folder / "got.npz") as got:
        return dict(got), proc.stdout.strip()
