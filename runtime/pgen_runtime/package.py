"""`load_package`: check a pgen package completely, then load its kernels with tvm_ffi only.

Nothing is loaded before the format version, the sha256 of every file, and the fit of a target to
this device have been checked: a tampered, truncated or foreign package raises `PackageError` and
leaves the process as it was.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from .errors import PackageError, ShapeError
from .kernel_table import KERNEL_NAMES
from .kernels import PagedKernels
from .spec import KV_LAYOUT, KV_LAYOUT_INT8, KV_LAYOUT_QUANTIZED, AttentionSpec
from .target import missing_cpu_features
from .tensors import parse_device

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but the manifest, by relative path."""
    return {
        str(p.relative_to(root)): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Open a package (folder or .tar), check its format version and every file's hash.

    Returns:
        (package folder, manifest).

    Raises:
        PackageError: missing, unreadable, wrong format, missing or altered file.
    """
    root = _open(Path(path))
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise PackageError(f"{root} has no {MANIFEST}; it is not a pgen package (build one with pgen package)") from None
    except ValueError as err:
        raise PackageError(f"{root / MANIFEST} is not valid JSON ({err}); the package is truncated, rebuild it") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(f"{root} has format version {version!r}; this runtime reads version {FORMAT_VERSION}. "
                           "Rebuild the package with a matching pgen, or upgrade pgen-runtime")
    if manifest.get("kv_layout") not in (KV_LAYOUT, KV_LAYOUT_QUANTIZED, KV_LAYOUT_INT8):
        raise PackageError(f"{root} uses KV layout {manifest.get('kv_layout')!r}; this runtime reads {KV_LAYOUT} "
                           f"({KV_LAYOUT_QUANTIZED} for fp8 KV, {KV_LAYOUT_INT8} for int8 KV). Rebuild the "
                           "package with a matching pgen")
    files = manifest.get("files") or {}
    # NOTE: the manifest is not hashed, so an emptied or edited "files" list must not switch the
    # checks off: every file in the package has to be listed, and every listed file must match.
    unlisted = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and p.name != MANIFEST and str(p.relative_to(root)) not in files)
    if unlisted:
        raise PackageError(f"{root}: {unlisted[0]} is not listed in the manifest ({len(unlisted)} unlisted files); "
                           "the package was altered. Rebuild it or copy it again")
    for rel, digest in sorted(files.items()):
        file = root / rel
        if not file.is_file():
            raise PackageError(f"{root}: {rel} is missing; the package is incomplete, copy or rebuild it whole")
        if _sha256(file) != digest:
            raise PackageError(f"{root}: {rel} does not match its sha256 in the manifest; the file was altered or "
                               "truncated. Rebuild the package or copy it again")
    return root, manifest


def load_package(path: str | Path, device: str = "cpu") -> PagedKernels:
    """Load a package's kernels for `device` ("cpu" or "cuda:N") without the TVM compiler.

    Returns:
        `PagedKernels` with decode, extend, cache_write, copy_blocks, swap_out and swap_in.

    Raises:
        PackageError: the package fails a check, or has no target that runs on this device.
    """
    root, manifest = read_manifest(path)
    spec = AttentionSpec.from_dict(manifest["spec"], source=f"{root / MANIFEST}")
    if manifest["kv_layout"] != spec.kv_layout:
        raise PackageError(f"{root}: the manifest's KV layout {manifest['kv_layout']!r} is not that of its spec "
                           f"(kv_dtype {spec.kv_dtype}: {spec.kv_layout!r}); it was altered or built by an older pgen: rebuild it")
    try:
        dev = parse_device(device)
    except ShapeError as err:
        raise PackageError(str(err)) from None
    cuda = dev.dlpack_device_type() == 2
    target = pick_target(manifest, root, cuda)
    from ._tvm_libs import load_tvm_runtime_libs

    lib_dir = root / "lib" / "tvm"
    load_tvm_runtime_libs(lib_dir, cuda=cuda)
    if cuda:
        _check_gpu_arch(target, dev)
    import tvm_ffi

    try:
        module = tvm_ffi.load_module(str(root / target["library"]))
    except Exception as err:  # tvm_ffi raises RuntimeError/ValueError alike
        raise PackageError(f"loading {target['library']} failed: {err}") from err
    kernels = target["kernels"]
    missing = [name for name in KERNEL_NAMES if name not in kernels]
    if missing:
        raise PackageError(f"{root / MANIFEST} lists no {missing} for target {target.get('name')}; rebuild the "
                           "package with this pgen (pgen build)")
    functions = {name: module[info["symbol"]] for name, info in kernels.items()}
    return PagedKernels(spec, functions, device, {n: info["config"] for n, info in kernels.items()})


def pick_target(manifest: dict[str, Any], root: Path, cuda: bool) -> dict[str, Any]:
    """The target of this package that runs here: CUDA for a GPU, else an llvm build whose CPU
    features this host has.

    Raises:
        PackageError: no target fits; the message says what to rebuild.
    """
    kind = "cuda" if cuda else "llvm"
    candidates = [t for t in manifest.get("targets", []) if t.get("kind") == kind]
    if not candidates:
        have = [t.get("name") for t in manifest.get("targets", [])]
        raise PackageError(f"{root} has no {kind} target (it has {have}); rebuild it with "
                           f"--targets {'cuda:sm_XX' if cuda else 'llvm'} for this device")
    if cuda:
        return candidates[0]
    problems = []
    for target in candidates:
        missing = missing_cpu_features(target.get("mcpu", ""), target.get("machine", ""),
                                       target.get("cpu_features"))
        if not missing:
            return target
        problems.append(f"{target['name']} ({target.get('mcpu')}) needs {', '.join(missing)}")
    raise PackageError(f"{root}: no CPU target runs on this host: {'; '.join(problems)}. "
                       "Rebuild the package on a host of this CPU family")


def _check_gpu_arch(target: dict[str, Any], dev) -> None:
    import tvm_ffi

    get_attr = tvm_ffi.get_global_func("runtime.GetDeviceAttr", allow_missing=True)
    if get_attr is None:
        return
    exists = get_attr(2, dev.index, 0)  # kExist
    if not exists:
        raise PackageError(f"no CUDA device cuda:{dev.index} on this host (is the NVIDIA driver loaded?)")
    version = str(get_attr(2, dev.index, 4))  # kComputeVersion, e.g. "9.0"
    major, minor = (int(x) for x in version.split("."))
    sass = [int(a[3:].rstrip("a")) for a in target["archs"]]
    ptx = int(target["ptx_arch"][3:].rstrip("a")) if target.get("ptx_arch") else None
    if any(a // 10 == major and a % 10 <= minor for a in sass) or (ptx and ptx <= major * 10 + minor):
        return
    raise PackageError(f"this GPU is sm_{major}{minor} but the package holds {target['archs']}; rebuild with "
                       f"--targets cuda:sm_{major}{minor}")


def _open(path: Path) -> Path:
    if path.is_dir():
        return path
    if path.is_file() and tarfile.is_tarfile(path):
        dest = Path(tempfile.mkdtemp(prefix="pgenpkg-"))
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")
        inner = [p for p in dest.iterdir() if (p / MANIFEST).is_file()]
        return inner[0] if len(inner) == 1 else dest
    raise PackageError(f"package {path} does not exist or is neither a folder nor a .tar; pass a .pgenpkg path")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
