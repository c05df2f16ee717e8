"""Loads the two TVM runtime libraries a pgen package ships, without the TVM compiler.

A TVM-exported kernel library resolves its helpers at load time through the global function
registry of apache-tvm-ffi. Two of those helpers live outside tvm_ffi:

- `libtvm_runtime.so` registers the CPU backend (`__TVMBackendParallelLaunch`, workspaces). A
  plain llvm kernel loads and runs without it, but one with a `T.parallel` loop segfaults on its
  first call (measured with TVM 0.27), so it is always loaded.
- `libtvm_runtime_cuda.so` registers `ffi.Module.load_from_bytes.cuda`, without which loading a
  CUDA library fails with "a loader of that name is not registered". It needs `libcudart.so.13`
  (shipped next to it, or the system's) and the driver's `libcuda.so.1` (never shipped).

NOTE: a second copy of libtvm_runtime.so from another path registers every global function twice,
which aborts the process. In a process that imported `tvm`, tvm's own copy serves CPU packages, and
a CUDA package is refused with a PackageError instead.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import tvm_ffi  # noqa: F401  # loads libtvm_ffi.so, which both libraries link against

from .errors import PackageError

CUDART_SONAME = "libcudart.so.13"
_loaded: dict[str, ctypes.CDLL] = {}


def _dlopen(name: str, path: str, mode: int, fix: str) -> None:
    if name in _loaded:
        return
    try:
        _loaded[name] = ctypes.CDLL(path, mode=mode)
    except OSError as err:
        raise PackageError(f"cannot load {name} ({path}): {err}. Fix: {fix}") from err


def load_tvm_runtime_libs(lib_dir: str | Path, cuda: bool) -> None:
    """Loads TVM's runtime libraries from `lib_dir` so `tvm_ffi.load_module` can load kernels.

    Order (measured): libtvm_ffi.so (by importing tvm_ffi) → libcudart.so.13 and libcuda.so.1,
    RTLD_GLOBAL, so that the dynamic linker finds them by soname → libtvm_runtime.so,
    RTLD_GLOBAL → libtvm_runtime_cuda.so, whose NEEDED entries are then all satisfied. Idempotent.

    Args:
        lib_dir: folder holding libtvm_runtime.so (and, for CUDA, libtvm_runtime_cuda.so and
            optionally libcudart.so.13).
        cuda: also load the CUDA runtime, for packages built for a CUDA target.

    Raises:
        PackageError: a library is missing or cannot be loaded; the message names the fix.
    """
    if "tvm" in sys.modules:
        if cuda:
            raise PackageError("this process imported tvm, whose runtime would clash with the package's CUDA "
                               "runtime; load CUDA packages in a process without tvm, or use "
                               "pgen.build_kernels(spec, 'cuda:sm_XX') here")
        return
    lib_dir = Path(lib_dir)
    global_mode = ctypes.RTLD_GLOBAL
    if cuda:
        shipped = lib_dir / CUDART_SONAME
        _dlopen(CUDART_SONAME, str(shipped) if shipped.is_file() else CUDART_SONAME, global_mode,
                f"ship {CUDART_SONAME} in {lib_dir} or install the CUDA 13 runtime "
                "(pip install nvidia-cuda-runtime)")
        _dlopen("libcuda.so.1", "libcuda.so.1", global_mode,
                "install an NVIDIA driver that supports CUDA 13 on this host")
    _dlopen("libtvm_runtime.so", str(lib_dir / "libtvm_runtime.so"), global_mode,
            "reinstall the package; it must ship libtvm_runtime.so")
    if cuda:
        _dlopen("libtvm_runtime_cuda.so", str(lib_dir / "libtvm_runtime_cuda.so"),
                ctypes.RTLD_LOCAL, "reinstall the package; it must ship libtvm_runtime_cuda.so")
