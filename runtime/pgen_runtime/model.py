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
from .kernels import PagedKernels, extend_splits
from .package import load_package, pick_target, read_manifest
from .spec import AttentionSpec
from .tensors import parse_device, to_numpy

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
        device: "cpu" (the only device model packages are built for so far).
        num_blocks: KV blocks per layer, the null block included; default: room for 4096 tokens.

    Raises:
        PackageError: not a model package, a failed check, or no target for this device.
    """

    def __init__(self, path: str | Path, device: str = "cpu", num_blocks: int | None = None) -> None:
        root, manifest = read_manifest(path)
        if "model" not in manifest:
            raise PackageError(f"{root} is a kernel package without a model; build one with pgen compile-model")
        if parse_device(device).dlpack_device_type() != 1:
            raise PackageError(f"device={device!r}: model packages run on the CPU so far; use device='cpu'")
        self.kernels: PagedKernels = load_package(root, device)
        self.root = root
        self.manifest = manifest
        self.info: dict[str, Any] = manifest["model"]
        self.spec: AttentionSpec = self.kernels.spec
        target = pick_target(manifest, root, cuda=False)
        import tvm_ffi

        try:
            executable = tvm_ffi.load_module(str(root / target["model_library"]))
            self._vm = executable["vm_load_executable"]()
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
        """Write the step's K/V into the pools and return float32 logits [B, vocab] of each last token."""
        tokens = len(step.input_ids)
        if tokens == 0 or step.q_indptr[-1] != tokens or len(step.slot_mapping) != tokens:
            raise ShapeError(f"a step needs T >= 1 tokens with q_indptr[-1] == len(slot_mapping) == T; got "
                             f"T={tokens}, q_indptr[-1]={int(step.q_indptr[-1])}, {len(step.slot_mapping)} slots")
        args = [step.input_ids.astype(np.int64)]
        if self._has_positions:
            args.append(step.positions.astype(np.int64))
        args += self.pools
        args += [step.block_tables, step.slot_mapping, step.q_indptr, step.seq_lens, step.logits_indices]
        if self._has_splits:
            # The step's split-KV factor is the length of this input (a shape the kernel launch reads).
            n = extend_splits(self.spec, self.kernels.configs["extend"], np.diff(step.q_indptr), step.seq_lens,
                              "cpu", self.kernels.parallelism)
            args.append(self._splits.setdefault(n, np.zeros(n, np.int32)))
        return to_numpy(self._main(*[np.ascontiguousarray(a) for a in args]))
