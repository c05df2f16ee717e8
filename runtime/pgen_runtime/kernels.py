"""`PagedKernels`: the six kernels of one spec on one device, with argument checks and plans.

Arrays are numpy arrays or any DLPack tensor (torch, cupy, tvm_ffi); outputs are written into the
`out` argument. Every call checks shapes, dtypes and devices before a kernel runs. Values (block
ids, lengths, slots) are checked when the plan is made: `plan_decode` / `plan_extend` read the
block tables and lengths once per step, and the plan is reused by every layer's `decode` / `extend`
(FlashInfer's plan/run split). Without a plan a call makes one itself, copying index arrays that
live on a GPU to the host first.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import tvm_ffi

from .errors import ConfigError, ShapeError
from .kernel_table import KERNEL_NAMES
from .spec import NULL_BLOCK_ID, AttentionSpec
from .tensors import from_numpy, parse_device, to_numpy, zeros

# Keep a split at least this many keys long: shorter ones cost more to merge than they save.
# A CPU split of 128 keys reads 1 MiB at the Llama-3-8B shape (fp32), against a merge of 2 KiB per
# head: 1 x 512 fp32 decode went from 256 us on one thread to 167 us with 2 splits.
MIN_KEYS_PER_SPLIT = {"cpu": 128, "cuda": 256}
# Split-KV aims for this many decode thread blocks per SM. On the H200 (bench/results/gpu/probe_splits.json)
# 2 per SM left 8 x 4096 and 8 x 16k tokens at 5 splits: 105 and 302 us, against 86 and 238-259 us
# with 16-32 splits; from batch 32 up the factor moved times by a few percent.
CUDA_BLOCKS_PER_SM = 8
# The most elements a CUDA KV pool may have: its kernels compute offsets in int32 (the CPU kernels
# in int64, so a CPU pool has no such bound).
MAX_CUDA_POOL_ELEMENTS = 2**31 - 1


@dataclass(frozen=True, slots=True)
class DecodePlan:
    num_splits: int
    batch: int
    indptr: Any  # [batch + 1] = 0..batch on the kernels' device: decode runs extend's template


@dataclass(frozen=True, slots=True)
class ExtendPlan:
    max_q_tiles: int
    batch: int
    num_tokens: int
    num_splits: int = 1


class PagedKernels:
    """decode, extend, cache_write, copy_blocks, swap_out and swap_in for one spec and device.

    Args:
        spec: the spec the kernels were built from.
        functions: kernel name -> callable taking DLPack tensors (a loaded TVM module's functions).
        device: "cpu" or "cuda:N".
        configs: kernel name -> schedule config the kernels were built with (decode's
            `max_splits`, extend's `q_tile` shape the plans).
        parallelism: decode tasks to aim for (CPU threads; CUDA: thread blocks, CUDA_BLOCKS_PER_SM
            per SM of an H100/H200).
    """

    def __init__(self, spec: AttentionSpec, functions: dict[str, Callable], device: str,
                 configs: dict[str, dict[str, Any]], parallelism: int | None = None) -> None:
        unknown = sorted(set(functions) - set(KERNEL_NAMES))
        if unknown:
            raise ConfigError(f"functions names {unknown}, which are not pgen kernels ({', '.join(KERNEL_NAMES)})")
        self.spec = spec
        self.device = device
        self.configs = configs
        # A tuning candidate's library holds one kernel: the others raise when called.
        self._fn = {name: functions.get(name) or _absent(name) for name in KERNEL_NAMES}
        self._kind = "cuda" if device.startswith("cuda") else "cpu"
        self._device_type = 2 if self._kind == "cuda" else 1
        self._aranges: dict[int, Any] = {}
        self.parallelism = parallelism or (CUDA_BLOCKS_PER_SM * 132 if self._kind == "cuda" else (os.cpu_count() or 1))

    # ---- pools ---------------------------------------------------------------------------

    def new_pool(self, num_blocks: int):
        """A zero-filled KV pool `spec.pool_shape(num_blocks)` ([num_blocks, 2, num_kv_heads,
        block_size, head_dim] of kv_dtype; codes and scale rows for int8/fp8 KV) on the kernels'
        device (`tensors.zeros`); on the CPU in memory Linux may back with 2 MiB huge pages
        (`tensors.host_zeros`)."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 2:
            raise ConfigError(f"num_blocks={num_blocks!r} must be an integer >= 2 (block {NULL_BLOCK_ID} is "
                              "reserved as the null block); give the pool more blocks")
        s = self.spec
        shape = s.pool_shape(int(num_blocks))
        if self._kind == "cuda":
            self._check_cuda_pool_size(shape)
        return zeros(shape, s.kv_storage_dtype, parse_device(self.device))

    # ---- plans ---------------------------------------------------------------------------

    def plan_decode(self, block_tables, seq_lens, num_blocks: int | None = None) -> DecodePlan:
        """Check a decode step's tables and lengths once, and choose its split-KV factor."""
        tables, lens = _host(block_tables, "block_tables"), _host(seq_lens, "seq_lens")
        self._check_tables(tables, lens, num_blocks)
        splits = decode_splits(self.spec, self.configs["decode"], lens, self._kind, self.parallelism)
        return DecodePlan(num_splits=splits, batch=len(lens), indptr=self._arange(len(lens) + 1))

    def plan_extend(self, block_tables, q_indptr, seq_lens, num_blocks: int | None = None) -> ExtendPlan:
        """Check an extend step's tables, query offsets and lengths once."""
        tables, lens = _host(block_tables, "block_tables"), _host(seq_lens, "seq_lens")
        indptr = _host(q_indptr, "q_indptr")
        self._check_tables(tables, lens, num_blocks)
        new = np.diff(indptr) if indptr.ndim == 1 else indptr
        if indptr.shape != (len(lens) + 1,) or indptr[0] != 0 or (len(new) and extrema(new)[0] < 0):
            raise ShapeError(f"q_indptr must be [batch+1] = [{len(lens) + 1}] non-decreasing from 0; "
                             f"got shape {indptr.shape} starting {indptr[:1].tolist()}")
        if len(new) and extrema(new - lens)[1] > 0:
            b = int(np.argmax(new > lens))
            raise ShapeError(f"sequence {b} has {int(new[b])} new tokens but seq_lens[{b}]={int(lens[b])}; "
                             "seq_lens must count the new tokens too")
        config = self.configs["extend"]
        return ExtendPlan(max_q_tiles=extend_q_tiles(config, new, self._kind), batch=len(lens),
                          num_tokens=int(indptr[-1]),
                          num_splits=extend_splits(self.spec, config, new, lens, self._kind, self.parallelism))

    # ---- kernels -------------------------------------------------------------------------

    def decode(self, q, kv_pool, block_tables, seq_lens, out, *, plan: DecodePlan | None = None) -> None:
        """out[b] = attention of q[b] [Hq, D] over the first seq_lens[b] cached tokens."""
        s = self.spec
        batch = _dim(block_tables, 0, "block_tables")
        self._check("block_tables", block_tables, (batch, None), "int32")
        self._check("q", q, (batch, s.num_q_heads, s.head_dim), s.dtype)
        self._check("out", out, (batch, s.num_q_heads, s.head_dim), s.dtype)
        self._check_pool(kv_pool)
        self._check("seq_lens", seq_lens, (batch,), "int32")
        plan = plan or self.plan_decode(block_tables, seq_lens, _dim(kv_pool, 0))
        _same_batch(plan.batch, batch)
        # NOTE: decode's split-KV workspace is sized for max_splits; more would write past it.
        self._check_splits("decode", plan.num_splits)
        self._fn["decode"](q, kv_pool, block_tables, plan.indptr, seq_lens, out, plan.num_splits, 1)

    def extend(self, q, kv_pool, block_tables, q_indptr, seq_lens, out, *, plan: ExtendPlan | None = None) -> None:
        """Ragged new tokens q [T, Hq, D] attend causally to their sequences' paged cache."""
        s = self.spec
        batch, tokens = _dim(block_tables, 0, "block_tables"), _dim(q, 0, "q")
        self._check("block_tables", block_tables, (batch, None), "int32")
        self._check("q", q, (tokens, s.num_q_heads, s.head_dim), s.dtype)
        self._check("out", out, (tokens, s.num_q_heads, s.head_dim), s.dtype)
        self._check_pool(kv_pool)
        self._check("q_indptr", q_indptr, (batch + 1,), "int32")
        self._check("seq_lens", seq_lens, (batch,), "int32")
        plan = plan or self.plan_extend(block_tables, q_indptr, seq_lens, _dim(kv_pool, 0))
        _same_batch(plan.batch, batch)
        if plan.num_tokens != tokens:
            raise ShapeError(f"q has {tokens} rows but q_indptr ends at {plan.num_tokens}; they must agree")
        self._check_splits("extend", plan.num_splits)
        self._fn["extend"](q, kv_pool, block_tables, q_indptr, seq_lens, out, plan.num_splits, plan.max_q_tiles)

    def _check_splits(self, kernel: str, num_splits: int) -> None:
        max_splits = self.configs[kernel].get("max_splits", 1)
        if not 1 <= num_splits <= max_splits:
            raise ShapeError(f"plan.num_splits={num_splits} is outside 1..{max_splits} (these kernels' "
                             f"max_splits for {kernel}); make the plan with plan_{kernel}")

    def cache_write(self, k, v, kv_pool, slot_mapping) -> None:
        """Write k, v [T, Hkv, D] to slots block*block_size + offset; a negative slot is skipped."""
        s = self.spec
        tokens = _dim(k, 0, "k")
        self._check("k", k, (tokens, s.num_kv_heads, s.head_dim), s.dtype)
        self._check("v", v, (tokens, s.num_kv_heads, s.head_dim), s.dtype)
        self._check_pool(kv_pool)
        self._check("slot_mapping", slot_mapping, (tokens,), "int32")
        if _readable(slot_mapping):
            slots = _host(slot_mapping, "slot_mapping")
            capacity = _dim(kv_pool, 0) * s.block_size
            bad = slots >= capacity
            if np.any(bad):
                raise ShapeError(f"slot_mapping holds {int(slots[bad][0])} but the pool has {capacity} slots "
                                 f"({_dim(kv_pool, 0)} blocks x {s.block_size}); use -1 to skip a token")
            live = slots[slots >= 0]
            if len(np.unique(live)) != len(live):
                raise ShapeError("slot_mapping names a slot twice; each token needs its own slot")
        self._fn["cache_write"](k, v, kv_pool, slot_mapping)

    def copy_blocks(self, kv_pool, pairs) -> None:
        """pool[dst] = pool[src] for each (src, dst) row of pairs [P, 2] (copy-on-write)."""
        self._check_pool(kv_pool)
        self._check("pairs", pairs, (None, 2), "int32", host_ok=True)
        if _readable(pairs):
            p = _host(pairs, "pairs")
            self._check_ids(p.reshape(-1), "pairs", _dim(kv_pool, 0))
            if len(np.unique(p[:, 1])) != len(p) or np.intersect1d(p[:, 0], p[:, 1]).size:
                raise ShapeError("pairs: every destination must be distinct and no destination may also "
                                 "be a source; split dependent copies into separate calls")
        if _dim(pairs, 0):
            self._fn["copy_blocks"](kv_pool, self._to_device(pairs))

    def swap_out(self, kv_pool, block_ids, host_buf) -> None:
        """host_buf[i] = pool[block_ids[i]]: gather blocks into one contiguous buffer."""
        self._swap("swap_out", kv_pool, block_ids, host_buf)

    def swap_in(self, host_buf, block_ids, kv_pool) -> None:
        """pool[block_ids[i]] = host_buf[i]: scatter a contiguous buffer back into the pool."""
        self._swap("swap_in", kv_pool, block_ids, host_buf)

    def _arange(self, n: int):
        if n not in self._aranges:
            self._aranges[n] = from_numpy(np.arange(n, dtype=np.int32), parse_device(self.device))
        return self._aranges[n]

    # ---- checks --------------------------------------------------------------------------

    def _swap(self, name: str, kv_pool, block_ids, buf) -> None:
        s = self.spec
        n = _dim(block_ids, 0, "block_ids")
        self._check_pool(kv_pool)
        self._check("block_ids", block_ids, (n,), "int32", host_ok=True)
        self._check("host_buf", buf, s.pool_shape(n), s.kv_storage_dtype)
        if _readable(block_ids):
            ids = _host(block_ids, "block_ids")
            self._check_ids(ids, "block_ids", _dim(kv_pool, 0))
            if name == "swap_in" and len(np.unique(ids)) != len(ids):
                raise ShapeError("block_ids names a block twice; swap_in needs distinct destination blocks")
        if n:
            block_ids = self._to_device(block_ids)
            args = (kv_pool, block_ids, buf) if name == "swap_out" else (buf, block_ids, kv_pool)
            self._fn[name](*args)

    def _check_pool(self, pool) -> None:
        s = self.spec
        self._check("kv_pool", pool, s.pool_shape(), s.kv_storage_dtype)
        if self._kind == "cuda":
            self._check_cuda_pool_size(tuple(_meta(pool, "kv_pool")[0]))

    @staticmethod
    def _check_cuda_pool_size(shape: tuple) -> None:
        """CUDA kernels compute pool offsets in int32 (the CPU's in int64): refuse a bigger pool."""
        if math.prod(shape) > MAX_CUDA_POOL_ELEMENTS:
            most = MAX_CUDA_POOL_ELEMENTS // math.prod(shape[1:])
            raise ConfigError(f"kv_pool of {shape[0]} blocks has {math.prod(shape)} elements; a CUDA pool holds at "
                              f"most {MAX_CUDA_POOL_ELEMENTS} (2^31 - 1): give it at most {most} blocks (one pool "
                              "per layer)")

    def _to_device(self, array):
        """A host index array (numpy) copied to the kernels' GPU; anything else as it is."""
        if self._kind == "cuda" and isinstance(array, np.ndarray):
            return from_numpy(np.ascontiguousarray(array), parse_device(self.device))
        return array

    def _check(self, name: str, array, shape: tuple, dtype: str, host_ok: bool = False) -> None:
        """Shape, dtype and device of one argument; `host_ok`: a numpy array is accepted on any
        device (an index array, checked here and copied to the GPU by `_to_device`)."""
        got_shape, got_dtype, device_type = _meta(array, name)
        if host_ok and isinstance(array, np.ndarray):
            device_type = self._device_type
        if len(got_shape) != len(shape) or any(d is not None and d != g for d, g in zip(shape, got_shape)):
            want = tuple("*" if d is None else d for d in shape)
            raise ShapeError(f"{name} has shape {tuple(got_shape)}; expected {want} (* = any size)")
        if got_dtype != dtype:
            raise ShapeError(f"{name} has dtype {got_dtype}; expected {dtype} (cast it, or build for that dtype)")
        if device_type != self._device_type:
            raise ShapeError(f"{name} is on device type {device_type} but these kernels run on {self.device}; "
                             "move it there first")

    def _check_tables(self, tables: np.ndarray, lens: np.ndarray, num_blocks: int | None) -> None:
        if tables.ndim != 2 or lens.shape != (tables.shape[0],):
            raise ShapeError(f"block_tables must be [batch, max_blocks] and seq_lens [batch]; got {tables.shape} "
                             f"and {lens.shape}")
        capacity = tables.shape[1] * self.spec.block_size
        low, high = extrema(lens) if len(lens) else (1, 1)
        if low < 1 or high > capacity:
            b = int(np.argmax((lens < 1) | (lens > capacity)))
            raise ShapeError(f"seq_lens[{b}]={int(lens[b])} is outside 1..{capacity} (the table holds "
                             f"{tables.shape[1]} blocks of {self.spec.block_size}); grow block_tables")
        if num_blocks is not None:
            used = np.arange(tables.shape[1])[None, :] * self.spec.block_size < lens[:, None]
            self._check_ids(tables[used], "block_tables", num_blocks)

    def _check_ids(self, ids: np.ndarray, name: str, num_blocks: int) -> None:
        # The null block is id 0 (spec.NULL_BLOCK_ID): valid ids are 1..num_blocks - 1.
        low, high = extrema(ids) if ids.size else (1, 1)
        if low < 1 or high >= num_blocks:
            bad = (ids < 0) | (ids >= num_blocks) | (ids == NULL_BLOCK_ID)
            raise ShapeError(f"{name} holds block id {int(ids[bad][0])}; valid ids are 1..{num_blocks - 1} "
                             f"(0 is the reserved null block)")


def _absent(name: str) -> Callable:
    def call(*args):
        raise ConfigError(f"these kernels hold no {name} (a library built for other kernels); build all of them")

    return call


def decode_splits(spec: AttentionSpec, config: dict[str, Any], seq_lens: np.ndarray, kind: str,
                  parallelism: int) -> int:
    """Split-KV factor of a decode step: enough tasks to fill `parallelism`, each split long enough.

    Pure (host arrays only), so a tuner can plan a call it runs on another machine.
    """
    work = len(seq_lens) * spec.num_kv_heads
    if kind == "cpu":
        work //= config.get("kv_heads_per_task", 1)
    return _split_factor(config, work, seq_lens, kind, parallelism)


def extend_splits(spec: AttentionSpec, config: dict[str, Any], new_tokens: np.ndarray, seq_lens: np.ndarray,
                  kind: str, parallelism: int) -> int:
    """Split-KV factor of an extend step (CPU; CUDA extend does not split): as decode's, counting
    the step's query tiles. A decode step through extend (one token per sequence, the engine's on
    the CPU) with fewer tiles than threads would leave threads idle: one 16k-token sequence took
    2.72 ms against decode's 1.79 at 2 splits (fp16 Llama-3-8B shape, 2 threads).

    Pure (host arrays only), like decode_splits.
    """
    if kind != "cpu" or not len(new_tokens):
        return 1
    tiles = int((-(-new_tokens.astype(np.int64) // config.get("q_tile", 1))).sum())
    return _split_factor(config, tiles * spec.num_kv_heads // config.get("kv_heads_per_task", 1), seq_lens, kind,
                         parallelism)


def _split_factor(config: dict[str, Any], work: int, seq_lens: np.ndarray, kind: str, parallelism: int) -> int:
    """Splits that fill `parallelism` tasks beside `work` unsplit ones, at most `max_splits`, each
    split at least MIN_KEYS_PER_SPLIT keys of the longest sequence."""
    splits = min(config.get("max_splits", 1), max(1, math.ceil(parallelism / max(work, 1))))
    longest = int(extrema(seq_lens)[1]) if len(seq_lens) else 0
    return max(1, min(splits, longest // MIN_KEYS_PER_SPLIT[kind]))


def extrema(values: np.ndarray) -> tuple:
    """(min, max) of a non-empty array. Below 64 elements through a Python list: a numpy
    reduction costs about 2 us a call, more than a small step's check (a decode step of one
    sequence checks a dozen arrays of a few elements)."""
    if values.size <= 64:
        items = values.ravel().tolist()
        return min(items), max(items)
    return values.min(), values.max()


def extend_q_tiles(config: dict[str, Any], new_tokens: np.ndarray, kind: str) -> int:
    """Query-tile slots per sequence an extend launch needs (at least one).

    CUDA: the longest sequence's tile count (a thread block per slot). CPU: the kernel numbers
    only non-empty tiles across the batch, so batch x slots need only cover all tiles; fewer slots
    mean fewer empty tasks (a 512-token chunk beside 255 one-token rows: 28.0 ms against 36.8 with
    the longest sequence's count, fp16 Llama-3-8B shape).
    """
    if not len(new_tokens):
        return 1
    # Every extend variant takes `q_tile` query tokens per task or thread block.
    tiles = -(-new_tokens.astype(np.int64) // config.get("q_tile", 1))
    if kind == "cpu":
        return max(int(-(-int(tiles.sum()) // len(tiles))), 1)
    return max(int(tiles.max()), 1)


# str(np.dtype) costs about a microsecond, and every kernel call checks 5-6 arrays.
_DTYPE_NAMES: dict[np.dtype, str] = {}


def _meta(array, name: str) -> tuple[tuple[int, ...], str, int]:
    if isinstance(array, np.ndarray):
        dtype = array.dtype
        text = _DTYPE_NAMES.get(dtype)
        if text is None:
            text = _DTYPE_NAMES[dtype] = str(dtype)
        return array.shape, text, 1
    try:
        tensor = array if isinstance(array, tvm_ffi.Tensor) else tvm_ffi.from_dlpack(array)
    except Exception as err:  # any object that is not a DLPack tensor
        raise ShapeError(f"{name} must be a numpy array or a DLPack tensor; got {type(array).__name__}") from err
    return tuple(int(d) for d in tensor.shape), str(tensor.dtype), tensor.device.dlpack_device_type()


def _dim(array, axis: int, name: str = "array") -> int:
    shape = getattr(array, "shape", None)
    if shape is None or len(shape) <= axis:
        raise ShapeError(f"{name} must be a numpy array or a DLPack tensor with at least {axis + 1} dimension(s); "
                         f"got {type(array).__name__} of shape {shape}")
    return int(shape[axis])


def _readable(array) -> bool:
    return isinstance(array, np.ndarray) or _meta(array, "array")[2] == 1


def _host(array, name: str) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    return to_numpy(array)


def _same_batch(planned: int, batch: int) -> None:
    if planned != batch:
        raise ShapeError(f"the plan was made for batch {planned} but this call has batch {batch}; plan again")
