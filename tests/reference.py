"""Float64 NumPy references for every pgen kernel, and the random paged cases they are checked on."""

from __future__ import annotations

import inspect
import subprocess
from pathlib import Path

import numpy as np

from pgen.reference import *  # noqa: F401,F403
from pgen.reference import attend, cache_write, copy_blocks, decode, extend, gather_kv  # noqa: F401
from pgen_runtime.spec import NULL_BLOCK_ID, AttentionSpec


# ---- random paged cases: inputs for all six kernels, their expected results, one runner -----------
# NOTE: a case is a dict of numpy arrays (np.savez writes it), so a process without pgen (the
# footprint venv) runs the kernels on exactly the inputs whose reference the test computed.


def paged_case(spec: AttentionSpec, seq_lens, new_tokens=None, seed: int = 0, spare_blocks: int = 6) -> dict:
    """Random inputs for every kernel, with K/V scattered over randomly placed blocks.

    Every pool slot no sequence uses holds NaN: slots past a sequence's length in its last block,
    whole unused blocks and the null block. Tables are padded with the null block id and have one
    column more than the longest sequence needs.

    Args:
        seq_lens: cached tokens per sequence (decode and extend both attend to these).
        new_tokens: extend's new tokens per sequence (default 1 each); the last of each sequence's
            cached tokens.
        spare_blocks: unused blocks, the destinations of cache_write, copy_blocks and swap_in.
    """
    rng = np.random.default_rng(seed)
    hq, hkv, d, bs = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.block_size
    lens = np.asarray(seq_lens, np.int32)
    new = np.ones_like(lens) if new_tokens is None else np.asarray(new_tokens, np.int32)
    need = -(-lens // bs)
    num_blocks = 1 + int(need.sum()) + spare_blocks
    ids = rng.permutation(np.arange(1, num_blocks, dtype=np.int32))
    used, spare = ids[: need.sum()], ids[need.sum():]
    tables = np.full((len(lens), int(need.max()) + 1), NULL_BLOCK_ID, np.int32)
    pool = np.full((num_blocks, 2, hkv, bs, d), np.nan, spec.kv_dtype)
    for b, (start, length) in enumerate(zip(np.cumsum(need) - need, lens)):
        tables[b, : need[b]] = used[start : start + need[b]]
        pos = np.arange(length)
        pool[tables[b, pos // bs], :, :, pos % bs, :] = rng.standard_normal((length, 2, hkv, d))
    spare_slots = (spare[:, None] * bs + np.arange(bs)).reshape(-1)
    slots = rng.choice(spare_slots, size=min(7, len(spare_slots)), replace=False).astype(np.int32)
    slots[len(slots) // 2] = -1  # skipped
    moved = min(3, len(spare), len(used))
    return {
        "pool": pool,
        "block_tables": tables,
        "seq_lens": lens,
        "q_decode": rng.standard_normal((len(lens), hq, d)).astype(spec.dtype),
        "q_indptr": np.concatenate([[0], np.cumsum(new)]).astype(np.int32),
        "q_extend": rng.standard_normal((int(new.sum()), hq, d)).astype(spec.dtype),
        "k": rng.standard_normal((len(slots), hkv, d)).astype(spec.dtype),
        "v": rng.standard_normal((len(slots), hkv, d)).astype(spec.dtype),
        "slot_mapping": slots,
        "pairs": np.stack([rng.choice(used, moved, replace=False), spare[:moved]], axis=1).astype(np.int32),
        "swap_ids": rng.choice(used, moved, replace=False).astype(np.int32),
    }


def expected(spec: AttentionSpec, case: dict) -> dict:
    """What `run_kernels` must return for `case`: float64 attention, exact bytes for the rest."""
    pool, ids = case["pool"], case["swap_ids"]
    return {
        "decode": decode(spec, case["q_decode"], pool, case["block_tables"], case["seq_lens"]),
        "extend": extend(spec, case["q_extend"], pool, case["block_tables"], case["q_indptr"], case["seq_lens"]),
        "cache_write": cache_write(case["k"], case["v"], pool, case["slot_mapping"]),
        "copy_blocks": copy_blocks(pool, case["pairs"]),
        "swap_out": pool[ids],
        "swap_in": pool,
    }


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
    got["swap_out"] = np.full((len(ids), *pool.shape[1:]), np.nan, pool.dtype)
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


def assert_attention_close(spec: AttentionSpec, got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert not np.isnan(got).any(), f"{what}: NaN in the output ({np.isnan(got).sum()} values)"
    err = rel_error(got, want)
    assert err < TOLERANCE[spec.dtype], f"{what}: relative error {err:.3g} >= {TOLERANCE[spec.dtype]}"


def assert_same_bytes(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bit-exact equality, NaN payloads included."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    assert got.tobytes() == want.tobytes(), f"{what}: {np.sum(got.view(np.uint8) != want.view(np.uint8))} bytes differ"


def assert_kernels_match(spec: AttentionSpec, got: dict, want: dict) -> None:
    """Compare `run_kernels` output with `expected`: attention within tolerance, the rest exact."""
    for name in ("decode", "extend"):
        assert_attention_close(spec, got[name], want[name], name)
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
