"""`PagedModel`: a compiled decoder from a model package, one forward per step, KV in paged pools.

It loads `model.so` (a Relax VM executable) and the package's kernels with apache-tvm-ffi only,
owns the per-layer KV pools, and runs one flattened ragged batch of new tokens per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PackageError, ShapeError
from .kernels import PagedKernels, extrema
from .package import load_package, pick_target, read_manifest
from .spec import AttentionSpec
from .tensors import from_numpy, parse_device, to_numpy

_POOLED_ALLOCATOR = 2


@dataclass(slots=True)
class StepInputs:
    """One step's flattened batch: B sequences, T new tokens (see pgen.onnx.rewrite)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    block_tables: np.ndarray  # [B, max_blocks] int32
    slot_mapping: np.ndarray  # [T] int32
    q_indptr: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32

    @property
    def logits_indices(self) -> np.ndarray:
        """Row of each sequence's last new token."""
        return (self.q_indptr[1:] - 1).astype(np.int64)


class PagedModel:
    """The model of a package, its kernels and its KV pools.

    Args:
        path: a package written by `pgen compile-model` (folder or .tar).
        device: "cpu", or "cuda:N" for a package compiled with a CUDA target (pools, weights and
            every step's activations live in that GPU's memory; logits come back to the host).
        num_blocks: KV blocks per layer, the null block included; default: room for 4096 tokens.

    Raises:
        PackageError: not a model package, a failed check, or no target for this device.
    """

    def __init__(self, path: str | Path, device: str = "cpu", num_blocks: int | None = None) -> None:
        root, manifest = read_manifest(path)
        if "model" not in manifest:
            raise PackageError(f"{root} is a kernel package without a model; build one with pgen compile-model")
        try:
            self.device = parse_device(device)
        except ShapeError as err:
            raise PackageError(str(err)) from None
        cuda = self.device.dlpack_device_type() == 2
        target = pick_target(manifest, root, cuda=cuda)  # before anything loads: a CPU package refuses cuda
        if "model_library" not in target:
            raise PackageError(f"{root}: target {target.get('name')} has no model library; rebuild the package "
                               f"with pgen compile-model --target {target.get('name')}")
        self.kernels: PagedKernels = load_package(root, device)  # checks the driver and the GPU's arch
        self.root = root
        self.manifest = manifest
        self.info: dict[str, Any] = manifest["model"]
        self.spec: AttentionSpec = self.kernels.spec
        import tvm_ffi

        try:
            executable = tvm_ffi.load_module(str(root / target["model_library"]))
            self._vm = executable["vm_load_executable"]()
            if cuda:  # the model's device, then the host (shape computations, the VM's own tensors)
                self._vm["vm_initialization"](2, self.device.index, _POOLED_ALLOCATOR, 1, 0, _POOLED_ALLOCATOR)
            else:
                self._vm["vm_initialization"](1, 0, _POOLED_ALLOCATOR)
            self._main = self._vm["main"]
        except Exception as err:  # tvm_ffi raises RuntimeError/ValueError alike
            raise PackageError(f"loading {target['model_library']} failed: {err}") from err
        s = self.spec
        num_blocks = num_blocks or 1 + 4096 // s.block_size
        self.pools = [self.kernels.new_pool(num_blocks) for _ in range(self.info["num_layers"])]
        self._has_positions = self.info["has_positions"]
        # Model packages built before extend split the KV have no kv_splits input (they never split).
        self._has_splits = any(i["name"] == "kv_splits" for i in self.info["inputs"])
        self._splits: dict[int, np.ndarray] = {}

    @property
    def num_layers(self) -> int:
        return len(self.pools)

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    @property
    def eos_token_id(self) -> int | None:
        return self.info["eos_token_id"]

    def forward(self, step: StepInputs) -> np.ndarray:
        """Write the step's K/V into the pools and return float32 logits [B, vocab] of each last token.

        Raises:
            ShapeError: the step is inconsistent, or names a token id, position, block or slot
                outside the model or the pools (checked before anything runs).
        """
        plan = self.check(step)
        args = [step.input_ids.astype(np.int64)]
        if self._has_positions:
            args.append(step.positions.astype(np.int64))
        args += self.pools
        args += [step.block_tables, step.slot_mapping, step.q_indptr, step.seq_lens, step.logits_indices]
        if self._has_splits:
            # The step's split-KV factor is the length of this input (a shape the kernel launch reads).
            if plan.num_splits not in self._splits:
                self._splits[plan.num_splits] = from_numpy(np.zeros(plan.num_splits, np.int32), self.device)
            args.append(self._splits[plan.num_splits])
        args = [from_numpy(a, self.device) if isinstance(a, np.ndarray) else a for a in args]
        return to_numpy(self._main(*args))

    def check(self, step: StepInputs):
        """The step's extend plan, after checking every index the model will follow.

        Raises:
            ShapeError: names the input, the value and the fix.
        """
        tokens = len(step.input_ids)
        if tokens == 0 or step.q_indptr[-1] != tokens or len(step.slot_mapping) != tokens or \
                (self._has_positions and len(step.positions) != tokens):
            raise ShapeError(f"a step needs T >= 1 tokens with q_indptr[-1] == len(slot_mapping) == "
                             f"len(positions) == T; got T={tokens}, q_indptr[-1]={int(step.q_indptr[-1])}, "
                             f"{len(step.slot_mapping)} slots, {len(step.positions)} positions")
        _check_range("input_ids", step.input_ids, self.vocab_size, "token ids index the vocabulary")
        if self._has_positions:
            _check_range("positions", step.positions, self.info.get("max_positions") or np.iinfo(np.int64).max,
                         "the model's position table ends there; shorten the sequence")
        _check_range("slot_mapping", step.slot_mapping, len(self.pools[0]) * self.spec.block_size,
                     "slots are block * block_size + offset in the pool", low=-1)
        return self.kernels.plan_extend(step.block_tables, step.q_indptr, step.seq_lens, len(self.pools[0]))


def _check_range(name: str, values: np.ndarray, end: int, why: str, low: int = 0) -> None:
    # NOTE: min/max first (`extrema`): masks and their `any` cost more than the step's attention on
    # a batch of one; the mask is built only to name the bad value.
    lo, hi = extrema(values) if len(values) else (low, low)
    if lo < low or hi >= end:
        bad = (values < low) | (values >= end)
        raise ShapeError(f"{name} holds {int(values[bad][0])}, outside [{low}, {end}): {why}")
