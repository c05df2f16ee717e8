"""Tests of pgen.cuda (real device code without a GPU) and of the runtime's TVM library loader."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pgen import BuildError, cuda

ARCHS = ("sm_80", "sm_90")


def _vadd_module(gpu: bool):
    import tvm  # noqa: PLC0415  # after ensure_cuda_build_env where a test needs CUDA
    from tvm.script import tirx as T  # noqa: PLC0415

    @T.prim_func(s_tir=True)
    def vadd(a: T.handle, b: T.handle, c: T.handle):
        T.func_attr({"global_symbol": "vadd", "tirx.noalias": True})
        n = T.int32()
        A = T.match_buffer(a, (n,), "float32")
        B = T.match_buffer(b, (n,), "float32")
        C = T.match_buffer(c, (n,), "float32")
        for i in range(n):
            with T.sblock("C"):
                vi = T.axis.spatial(n, i)
                C[vi] = A[vi] + B[vi]

    sch = tvm.s_tir.Schedule(tvm.IRModule({"vadd": vadd}))
    sch.work_on("vadd")
    (loop,) = sch.get_loops(sch.get_sblock("C"))
    if gpu:
        bx, tx = sch.split(loop, [None, 128])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    else:  # T.parallel makes the kernel need libtvm_runtime.so's thread pool
        sch.parallel(loop)
    return sch.mod


@pytest.fixture(scope="module")
def cuda_build(cuda_toolchain, tmp_path_factory):
    executable, cubins = cuda.build_cuda(_vadd_module(gpu=True), archs=ARCHS)
    lib = tmp_path_factory.mktemp("cuda") / "vadd.so"
    executable.export_library(str(lib))
    return lib, cubins


def _package_libs(tmp_path: Path, gpu: bool) -> Path:
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    for path in cuda.tvm_runtime_lib_paths(cuda=gpu):
        shutil.copy2(path, lib_dir / path.name)
    return lib_dir


def _run_without_tvm(script: str) -> str:
    """Runs `script` in a fresh interpreter and checks that it never imported tvm."""
    check = "\nassert 'tvm' not in sys.modules, 'the runtime imported tvm'\n"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script) + check],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.cuda
def test_build_cuda_embeds_sass_for_every_arch(cuda_build):
    lib, cubins = cuda_build
    fatbins = cuda.find_fatbins(lib.read_bytes())
    assert len(fatbins) == 1
    report = cuda.sass_report(fatbins[0])
    assert sorted(report) == list(ARCHS) == sorted(cubins)
    for arch, kernels in report.items():
        (kernel,) = kernels
        assert kernel.name == "vadd_kernel" and kernel.arch == arch
        assert 4 <= kernel.registers <= 64 and kernel.instructions > 5
        assert (kernel.local_bytes, kernel.local_stores, kernel.local_loads) == (0, 0, 0)
        assert cuda.sass_report(cubins[arch]) == {arch: [kernel]}


@pytest.mark.cuda
def test_exported_cuda_lib_loads_with_tvm_ffi_only(cuda_build, tmp_path):
    lib, _ = cuda_build
    lib_dir = _package_libs(tmp_path, gpu=True)
    # The stub stands in for the driver here; a GPU host has the real libcuda.so.1.
    out = _run_without_tvm(f"""
        import ctypes, sys
        try:
            ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            ctypes.CDLL({str(cuda._stub_libcuda())!r}, mode=ctypes.RTLD_GLOBAL)
        import tvm_ffi
        from pgen_runtime._tvm_libs import load_tvm_runtime_libs
        load_tvm_runtime_libs({str(lib_dir)!r}, cuda=True)
        mod = tvm_ffi.load_module({str(lib)!r})
        print([m.kind for m in mod.imports], mod.get_function("vadd") is not None)
    """)
    assert out.strip() == "['cuda'] True"


def test_exported_llvm_lib_runs_with_tvm_ffi_only(tmp_path):
    import tvm  # noqa: PLC0415

    lib = tmp_path / "vadd_cpu.so"
    tvm.compile(_vadd_module(gpu=False), target={"kind": "llvm"}).export_library(str(lib))
    lib_dir = _package_libs(tmp_path, gpu=False)
    out = _run_without_tvm(f"""
        import sys
        import numpy as np, tvm_ffi
        from pgen_runtime._tvm_libs import load_tvm_runtime_libs
        load_tvm_runtime_libs({str(lib_dir)!r}, cuda=False)
        a, b = np.arange(1000, dtype="float32"), np.full(1000, 2, dtype="float32")
        c = np.zeros_like(a)
        tvm_ffi.load_module({str(lib)!r})["vadd"](*map(tvm_ffi.from_dlpack, (a, b, c)))
        print(float(c.sum()))
    """)
    assert float(out) == float(np.arange(1000).sum() + 2000)


def test_find_fatbins_uses_header_sizes_and_skips_stray_magic():
    def fatbin(payload: bytes) -> bytes:
        return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(payload)) + payload

    stray = struct.pack("<I", 0xBA55ED50) + b"\xff" * 3  # magic without a valid header
    first, second = fatbin(b"A" * 40), fatbin(b"B" * 8)
    blob = b"\0" * 7 + stray + first + b"junk" + second + fatbin(b"C" * 99)[:30]
    assert cuda.find_fatbins(blob) == [first, second]


def test_build_cuda_rejects_malformed_arch():
    with pytest.raises(BuildError, match="archs="):
        cuda.build_cuda(None, archs=("80",))
