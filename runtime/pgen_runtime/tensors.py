"""Arrays on any device through TVM's runtime functions (no torch, no TVM compiler).

Kernels accept numpy arrays and any DLPack tensor (torch, cupy, tvm_ffi). The runtime itself
allocates its scratch (index arrays for a plan) with these helpers, which need libtvm_runtime.so
loaded (a package load or `import tvm` does that).
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import tvm_ffi

from .errors import ShapeError

_DEVICE_TYPES = {"cpu": 1, "cuda": 2}
HUGE_PAGE_BYTES = 2 << 20
_ZERO_CHUNK_BYTES = 64 << 20


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


def zeros(shape, dtype: str, device: tvm_ffi.Device):
    """A zero-filled tensor on `device`: host memory from `host_zeros` on the CPU (numpy), else
    `empty` zeroed in chunks, so a large device pool needs no host copy of its size."""
    if device.dlpack_device_type() == 1 and dtype != "bfloat16":
        return host_zeros(shape, dtype)
    out = empty(shape, dtype, device)
    _zero_fill(out, dtype)
    return out


def _zero_fill(tensor, dtype: str) -> None:
    """Write zeros over a tvm_ffi tensor, _ZERO_CHUNK_BYTES at a time through flat views."""
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    total = int(np.prod(tuple(tensor.shape)))
    step = max(1, _ZERO_CHUNK_BYTES // itemsize)
    zero = np.zeros(min(total, step) * itemsize, np.uint8)
    view = tvm_ffi.get_global_func("runtime.TVMTensorCreateView")
    for start in range(0, total, step):
        n = min(step, total - start)
        copy_from_bytes(view(tensor, tvm_ffi.Shape([n]), tvm_ffi.dtype(dtype), start * itemsize), zero[: n * itemsize])


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
    """Copy any DLPack tensor (host or device) into a new numpy array; bfloat16 as its uint16 bits,
    pgen's host form of it (also from a numpy array of bfloat16 values, as TVM's RPC tensors give)."""
    if isinstance(tensor, np.ndarray):
        if dtype == "bfloat16" and tensor.dtype != np.uint16 and tensor.dtype.itemsize == 2:
            return tensor.view(np.uint16).copy()
        return tensor.copy()
    if not isinstance(tensor, tvm_ffi.Tensor):
        tensor = tvm_ffi.from_dlpack(tensor)
    dtype = dtype or str(tensor.dtype)
    out = np.empty(tuple(tensor.shape), dtype="uint16" if dtype == "bfloat16" else dtype)
    copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")
    copy(tensor, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out


def host_zeros(shape, dtype: str) -> np.ndarray:
    """A zero-filled host array in its own mapping, which Linux may back with 2 MiB huge pages.

    NOTE: for KV pools. Decode reads blocks in block-table order, i.e. from random places in the
    pool, and on 4 KiB pages every page of a block is a TLB miss. On transparent huge pages (the
    mapping is 2 MiB aligned and advised MADV_HUGEPAGE; Linux's default THP mode, `madvise`, only
    backs advised memory) a pure read of random 128 KiB blocks ran at 66-73 GB/s against 61-65 on
    4 KiB pages (2 threads, sequential read 75 GB/s), and Llama-3-8B decode at 32 x 4096 and
    8 x 4096 tokens gained 1-8% side by side. Where the OS offers no huge pages the mapping is an
    ordinary one (anonymous memory is zero-filled either way). Arrays under 2 MiB are plain numpy.
    """
    shape = tuple(int(s) for s in shape)
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):  # too small for one huge page
        return np.zeros(shape, dt)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel built without THP: plain pages
            pass
    raw = np.frombuffer(buf, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE_BYTES
    # The array keeps the mapping alive (numpy holds the buffer); it is unmapped with the array.
    return raw[start:start + nbytes].view(dt).reshape(shape)


def huge_page_eligible(array: np.ndarray) -> bool | None:
    """Whether Linux may back `array`'s memory with transparent huge pages (its mapping's
    THPeligible flag in /proc/self/smaps); None where the kernel does not say."""
    value = _smaps_fields(array).get("THPeligible")
    return None if value is None else value.split()[0] == "1"


def huge_page_share(array: np.ndarray) -> float | None:
    """The share of the resident memory of `array`'s mapping that sits on transparent huge pages
    (AnonHugePages / Rss in /proc/self/smaps); None where the kernel does not say. Linux merges
    neighbouring mappings with the same flags, so this may cover other `host_zeros` arrays too."""
    fields = _smaps_fields(array)
    if "AnonHugePages" not in fields or "Rss" not in fields:
        return None
    rss = int(fields["Rss"].split()[0])
    return int(fields["AnonHugePages"].split()[0]) / rss if rss else 0.0


def _smaps_fields(array: np.ndarray) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `array`'s first byte ({} if none)."""
    addr = array.__array_interface__["data"][0]
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    inside = False
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if not head.endswith(":"):  # a mapping's first line: "lo-hi perms offset ..."
            if inside:
                break
            lo, _, hi = head.partition("-")
            inside = lo != "" and int(lo, 16) <= addr < int(hi or "0", 16)
        elif inside:
            fields[head[:-1]] = rest.strip()
    return fields
