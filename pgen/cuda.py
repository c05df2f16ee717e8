"""CUDA toolchain: real device code from TVM on a host without a GPU, and SASS resource reports.

NOTE: without libcuda.so.1, `import tvm` fails to load libtvm_runtime_cuda.so and TVM silently
emits a source-only CUDA module (nvcc never runs). `ensure_cuda_build_env` loads the driver, or a
stub whose every call returns CUDA_ERROR_NO_DEVICE, then loads libtvm_runtime_cuda.so itself if
tvm was imported first; both orders were measured to give real cubins with TVM 0.27.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from pgen_runtime._tvm_libs import CUDART_SONAME
from pgen_runtime.errors import BuildError

# The driver symbols libtvm_runtime_cuda.so (TVM 0.27) imports; `nm -D --undefined-only` lists them.
_STUB_SOURCE = r"""
typedef int CUresult;
enum { NO_DEVICE = 100 };
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "pgen build stub: no CUDA driver"; return 0; }
CUresult cuDeviceGetName(char *n, int l, int d) { (void)n; (void)l; (void)d; return NO_DEVICE; }
CUresult cuFuncSetAttribute(void *f, int a, int v) { (void)f; (void)a; (void)v; return NO_DEVICE; }
CUresult cuLaunchKernelEx(const void *c, void *f, void **p, void **e) { (void)c; (void)f; (void)p; (void)e; return NO_DEVICE; }
CUresult cuModuleGetFunction(void **f, void *m, const char *n) { (void)f; (void)m; (void)n; return NO_DEVICE; }
CUresult cuModuleLoadData(void **m, const void *i) { (void)m; (void)i; return NO_DEVICE; }
CUresult cuModuleUnload(void *m) { (void)m; return NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void *t, int dt, unsigned r, void *g, const void *gd, const void *gs,
                                const void *bd, const void *es, int il, int sw, int l2, int oob) {
  (void)t; (void)dt; (void)r; (void)g; (void)gd; (void)gs; (void)bd; (void)es; (void)il; (void)sw;
  (void)l2; (void)oob; return NO_DEVICE;
}
"""
_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_HEADER = struct.Struct("<IHHQ")  # magic, version, header size, size of what follows
_ARCH_RE = re.compile(r"sm_\d+a?")
_SASS_LINE = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)")  # opcode
_MMA_OPCODES = frozenset({"HMMA", "IMMA", "HGMMA", "IGMMA", "DMMA", "QGMMA"})
_env_ready = False
_compile_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class KernelResources:
    """What one kernel uses on one arch, read from its SASS.

    `local_stores`/`local_loads` count STL/LDL instructions: register spills plus local arrays,
    so 0 proves there are no spills. `mma_instructions` counts tensor-core instructions (HMMA,
    IMMA, HGMMA): 0 means the kernel multiplies on the CUDA cores only.
    """

    name: str
    arch: str
    registers: int
    shared_bytes: int  # static shared memory; dynamic shared memory is set at launch
    local_bytes: int
    stack_bytes: int
    instructions: int
    local_stores: int
    local_loads: int
    mma_instructions: int = 0


def _cuda_roots() -> list[Path]:
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    return roots + [Path("/usr/local/cuda")]


def _find_nvcc() -> Path:
    found = shutil.which("nvcc")
    candidates = ([Path(found)] if found else []) + [r / "bin" / "nvcc" for r in _cuda_roots()]
    for nvcc in candidates:
        if nvcc.is_file() and os.access(nvcc, os.X_OK):
            return nvcc
    raise BuildError("nvcc not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin. Fix: "
                     "install the CUDA 13 toolkit, or set CUDA_HOME to its folder")


def _stub_libcuda() -> Path:
    """Builds the stub driver once per source version (build → atomic rename)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pgen" / "cuda-stub"
    key = hashlib.sha256(_STUB_SOURCE.encode()).hexdigest()[:12]
    lib = cache / key / "libcuda.so.1"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "stub.c", Path(tmp) / "libcuda.so.1"
        src.write_text(_STUB_SOURCE)
        cmd = ["gcc", "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(out),
               str(src)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or err
            raise BuildError(f"building the stub libcuda.so.1 failed: {detail}. Fix: install gcc "
                             "(apt-get install gcc), or install an NVIDIA driver") from err
        os.replace(out, lib)
    return lib


def ensure_cuda_build_env() -> None:
    """Makes TVM build real CUDA device code on this host, with or without a GPU. Idempotent.

    Finds nvcc (and puts it on PATH, where TVM looks), loads libcuda.so.1 RTLD_GLOBAL (the real
    driver, else a stub built into ~/.cache/pgen/cuda-stub/), sets TVM_CUDA_COMPILE_MODE=nvcc and,
    if tvm was already imported without its CUDA runtime, loads libtvm_runtime_cuda.so.

    Raises:
        BuildError: nvcc is missing, or the stub cannot be built; the message names the fix.
    """
    global _env_ready
    nvcc = _find_nvcc()
    if _env_ready:
        return
    if shutil.which("nvcc") is None:
        os.environ["PATH"] = f"{nvcc.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(_stub_libcuda()), mode=ctypes.RTLD_GLOBAL)
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    if "tvm" in sys.modules:
        from tvm.base import _LOADED_LIBS  # noqa: PLC0415  # tvm only when already imported

        if "tvm_runtime_cuda" not in _LOADED_LIBS:
            path = _tvm_lib_dir() / "libtvm_runtime_cuda.so"
            _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    _env_ready = True


def _elf_arch(cubin: bytes) -> str:
    # NOTE: CUDA ELF ABI version 8 (CUDA 12.8+) moved the SM number to bits 8-15 of e_flags.
    (flags,) = struct.unpack_from("<I", cubin, 48)
    return f"sm_{(flags >> 8) & 0xFF if cubin[8] >= 8 else flags & 0xFF}"


def build_cuda(mod, archs: tuple[str, ...] = ("sm_80", "sm_90"), *, embed_ptx: bool = True,
               relax_pipeline=None):
    """Compiles an IRModule into one library whose fatbin holds SASS for each arch.

    TVM generates CUDA source once, for the oldest arch; nvcc compiles it with one -gencode per
    arch (plus PTX of the newest when `embed_ptx`, so newer GPUs can JIT it).

    Args:
        mod: a `tvm.IRModule` of scheduled PrimFuncs, or a Relax module (with `relax_pipeline`).
        archs: SM architectures, such as "sm_80" or "sm_90a".
        embed_ptx: also embed PTX for the newest arch.
        relax_pipeline: the Relax pipeline of a module with Relax functions (a model); it runs
            inside the target's scope, as TVM's GPU pipelines (dlight) expect.

    Returns:
        `(executable, cubins)`: the `tvm.compile` result (export it with `export_library`) and
        `{arch: cubin bytes}` as nvcc produced them.

    Raises:
        BuildError: an arch is malformed, nvcc is missing or fails, or no device code came out.
    """
    if not archs or any(not _ARCH_RE.fullmatch(a) for a in archs):
        raise BuildError(f"archs={archs!r} is invalid. Fix: pass names like ('sm_80', 'sm_90')")
    archs = tuple(sorted(set(archs), key=lambda a: int(re.sub(r"\D", "", a))))
    ensure_cuda_build_env()
    import tvm  # noqa: PLC0415  # after the env: then TVM loads its CUDA runtime itself
    import tvm_ffi  # noqa: PLC0415
    from tvm.support import nvcc  # noqa: PLC0415  # registers the callback we replace for a while

    gencode = [f"-gencode=arch=compute_{a[3:]},code=sm_{a[3:]}" for a in archs]
    if embed_ptx:
        gencode.append(f"-gencode=arch=compute_{archs[-1][3:]},code=compute_{archs[-1][3:]}")
    cubins: dict[str, bytes] = {}

    from .schedules import CUDA_PRELUDE  # noqa: PLC0415  # device helpers the schedules call

    def compile_fatbin(code: str) -> bytearray:
        code = CUDA_PRELUDE + code
        with tempfile.TemporaryDirectory(prefix="pgen-nvcc-") as keep:
            fatbin = nvcc.compile_cuda(code, target_format="fatbin", arch=gencode, compiler="nvcc",
                                       options=["--keep", f"--keep-dir={keep}"])
            for path in Path(keep).glob("*.cubin"):
                cubin = path.read_bytes()
                cubins[_elf_arch(cubin)] = cubin
        return fatbin

    with _compile_lock:
        previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_fatbin, override=True)
        try:
            with tvm.target.Target({"kind": "cuda", "arch": archs[0]}) as target:
                executable = tvm.compile(mod, target=target, **(
                    {"relax_pipeline": relax_pipeline} if relax_pipeline is not None else {}))
        except Exception as err:  # TVM raises RuntimeError/ValueError/TVMError alike
            raise BuildError(f"CUDA build for {archs} failed: {err}") from err
        finally:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)
    device = [m for m in _imported(executable.mod) if m.kind == "cuda"]
    if not device or not all(m.is_runnable() for m in device) or set(cubins) != set(archs):
        raise BuildError(f"TVM produced no device code for {archs} (source-only CUDA module, or "
                         f"cubins for {sorted(cubins)}). Fix: call "
                         "pgen.cuda.ensure_cuda_build_env() first and check that nvcc runs")
    return executable, cubins


def _imported(module) -> list:
    """Every module `module` imports, transitively (a Relax executable imports its host code,
    which imports the device code)."""
    found = []
    for child in module.imports:
        found += [child, *_imported(child)]
    return found


def find_fatbins(blob: bytes) -> list[bytes]:
    """Returns every CUDA fatbin embedded in `blob` (an exported .so), using its header sizes."""
    found, start = [], 0
    magic = struct.pack("<I", _FATBIN_MAGIC)
    while (at := blob.find(magic, start)) >= 0:
        if at + _FATBIN_HEADER.size > len(blob):
            break
        _, version, header, size = _FATBIN_HEADER.unpack_from(blob, at)
        end = at + header + size
        if version == 1 and header >= _FATBIN_HEADER.size and end <= len(blob):
            found.append(bytes(blob[at:end]))
            start = end
        else:
            start = at + 4
    return found


def _nvidia_wheel_file(pattern: str) -> Path | None:
    # NVIDIA's CUDA 13 wheels (nvidia-cuda-cuobjdump, -nvdisasm, -runtime) install into
    # site-packages/nvidia/cu13/{bin,lib}.
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        for path in Path(root).glob(pattern):
            return path
    return None


def _find_tool(name: str, package: str) -> Path:
    found = shutil.which(name)
    tool = Path(found) if found else _nvidia_wheel_file(f"cu*/bin/{name}")
    if tool is None:
        raise BuildError(f"{name} not found on PATH or in site-packages. "
                         f"Fix: pip install {package}")
    return tool


def _cuobjdump(flag: str, binary: Path) -> str:
    cuobjdump = _find_tool("cuobjdump", "nvidia-cuda-cuobjdump")
    env = dict(os.environ)
    if flag == "--dump-sass":
        env["NVDISASM_PATH"] = str(_find_tool("nvdisasm", "nvidia-cuda-nvdisasm").parent)
    proc = subprocess.run([str(cuobjdump), flag, str(binary)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise BuildError(f"cuobjdump {flag} {binary.name} failed: {proc.stderr.strip()}")
    return proc.stdout


def _parse_resources(text: str, arch: str) -> dict[tuple[str, str], dict[str, int]]:
    usage, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"arch = (sm_\w+)", line):
            arch = m[1]
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m[1]
        elif name is not None:
            pairs = re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)
            usage[(arch, name)] = {key: int(value) for key, value in pairs}
            name = None
    return usage


def _parse_sass(text: str, arch: str) -> dict[tuple[str, str], list[str]]:
    opcodes, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*code for (sm_\w+)", line):
            arch = m[1]
        elif m := re.match(r"\s*Function : (\S+)", line):
            name = m[1]
            opcodes[(arch, name)] = []
        elif name and (m := _SASS_LINE.match(line)):
            opcodes[(arch, name)].append(m[1])
    return opcodes


def sass_report(binary: bytes) -> dict[str, list[KernelResources]]:
    """Reads per-kernel resources of every SASS entry in a fatbin or cubin (PTX is skipped).

    Needs cuobjdump and nvdisasm (PATH, or the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels).

    Returns:
        `{arch: [KernelResources, ...]}` sorted by kernel name; an arch appears only if it has SASS.

    Raises:
        BuildError: a tool is missing or fails; the message names the fix.
    """
    is_cubin = binary[:4] == b"\x7fELF"
    default_arch = _elf_arch(binary) if is_cubin else "unknown"
    with tempfile.TemporaryDirectory(prefix="pgen-sass-") as tmp:
        path = Path(tmp) / ("kernels.cubin" if is_cubin else "kernels.fatbin")
        path.write_bytes(binary)
        usage = _parse_resources(_cuobjdump("--dump-resource-usage", path), default_arch)
        opcodes = _parse_sass(_cuobjdump("--dump-sass", path), default_arch)
    report: dict[str, list[KernelResources]] = {}
    for (arch, name), ops in sorted(opcodes.items()):
        res = usage.get((arch, name), {})
        report.setdefault(arch, []).append(KernelResources(
            name=name, arch=arch, registers=res.get("REG", 0), shared_bytes=res.get("SHARED", 0),
            local_bytes=res.get("LOCAL", 0), stack_bytes=res.get("STACK", 0),
            instructions=sum(op != "NOP" for op in ops),
            local_stores=sum(op.startswith("STL") for op in ops),
            local_loads=sum(op.startswith("LDL") for op in ops),
            mma_instructions=sum(op.split(".")[0] in _MMA_OPCODES for op in ops)))
    return report


def _tvm_lib_dir() -> Path:
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the tvm package is not installed. "
                         "Fix: pip install apache-tvm==0.27.0.post1")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _find_cudart() -> Path:
    subdirs = ("lib64", "lib", "targets/x86_64-linux/lib")
    for path in [root / sub / CUDART_SONAME for root in _cuda_roots() for sub in subdirs]:
        if path.is_file():
            return path.resolve()
    if wheel := _nvidia_wheel_file(f"cu*/lib/{CUDART_SONAME}"):
        return wheel.resolve()
    raise BuildError(f"{CUDART_SONAME} not found in the CUDA install or site-packages. "
                     "Fix: install the CUDA 13 toolkit or pip install nvidia-cuda-runtime")


def tvm_runtime_lib_paths(cuda: bool) -> list[Path]:
    """The libraries a package ships so `pgen_runtime._tvm_libs.load_tvm_runtime_libs` works.

    Returns:
        libtvm_runtime.so, plus for CUDA libtvm_runtime_cuda.so and libcudart.so.13 (never
        libcuda.so.1: the serving host's driver provides it).
    """
    lib_dir = _tvm_lib_dir()
    paths = [lib_dir / "libtvm_runtime.so"]
    if cuda:
        paths += [lib_dir / "libtvm_runtime_cuda.so", _find_cudart()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise BuildError(f"missing TVM runtime libraries {missing}. Fix: reinstall apache-tvm")
    return paths
