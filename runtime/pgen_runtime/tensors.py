"""Arrays on any device through TVM's runtime functions (no torch, no TVM compiler).

Kernels accept numpy arrays and any DLPack tensor (torch, cupy, tvm_ffi). The runtime itself
allocates its scratch (index arrays for a plan) with these helpers, which need libtvm_runtime.so
loaded (a package load or `import tvm` does that).
"""

from __future__ import annotations

import ctypes

import numpy as np
import tvm_ffi

from .errors import ShapeError

_DEVICE_TYPES = {"cpu": 1, "cuda": 2}


def parse_device(device: str) -> tvm_ffi.Device:
    """`cpu`, `cuda` or `cuda:N` -> tvm_ffi.Device."""
    kind, _, index = str(device).partition(":")
    if kind not in _DEVICE_TYPES or (index and not index.isdigit()):
        raise ShapeError(f"device={device!r} is not supported; use 'cpu' or 'cuda:N'")
    return tvm_ffi.device(kind, int(index or 0))


def empty(shape, dtype: str, device: tvm_ffi.Device):
    """An uninitialized tensor on `device` (a numpy array on the CPU, except for bfloat16)."""
    if device.dlpack_device_type() == 1 and dtype != "bfloat16":
        return np.empty(tuple(int(s) for s in shape), dtype)
    alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope", allow_missing=True)
    if alloc is None:
        raise ShapeError(f"allocating {dtype} on {device} needs TVM's runtime library: load a package "
                         "(pgen_runtime.load_package) or build kernels (pgen.build_kernels) first")
    return alloc(tvm_ffi.Shape([int(s) for s in shape]), tvm_ffi.dtype(dtype), device, None)


def from_numpy(array: np.ndarray, device: tvm_ffi.Device):
    """A copy of `array` on `device` (the array itself when the device is the CPU)."""
    array = np.ascontiguousarray(array)
    if device.dlpack_device_type() == 1:
        return array
    out = empty(array.shape, str(array.dtype), device)
    copy_from_bytes(out, array)
    return out


def copy_from_bytes(tensor, array: np.ndarray) -> None:
    """Copy the bytes of a contiguous host array into `tensor` (same byte size, any device)."""
    array = np.ascontiguousarray(array)
    copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
    copy(tensor, array.ctypes.data_as(ctypes.c_void_p), array.nbytes)


def to_numpy(tensor, dtype: str | None = None) -> np.ndarray:
    """Copy any DLPack tensor (host or device) into a new numpy array."""
    if isinstance(tensor, np.ndarray):
        return tensor.copy()
    if not isinstance(tensor, tvm_ffi.Tensor):
        tensor = tvm_ffi.from_dlpack(tensor)
    dtype = dtype or str(tensor.dtype)
    out = np.empty(tuple(tensor.shape), dtype="uint16" if dtype == "bfloat16" else dtype)
    copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")
    copy(tensor, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out
