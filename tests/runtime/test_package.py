"""Packages: what `pgen package` writes, and `load_package`'s checks before it loads anything."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import reference
import tvm_ffi

import pgen_runtime
from pgen import AttentionSpec, PackageError
from pgen_runtime.kernel_table import KERNEL_NAMES as KERNELS
from pgen.package import package
from pgen_runtime import _tvm_libs, load_package
from pgen_runtime import target as runtime_target
from pgen_runtime.errors import ConfigError
from pgen_runtime.package import FORMAT_VERSION, MANIFEST
from pgen_runtime.spec import KV_LAYOUT_QUANTIZED
from pgen_runtime import tensors
from pgen_runtime.tensors import HUGE_PAGE_BYTES, huge_page_eligible

SPEC = AttentionSpec(num_q_heads=14, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16")
LENS, NEW = [1, 15, 17, 2100], [1, 15, 2, 67]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory) -> Path:
    return package(SPEC, "llvm", tmp_path_factory.mktemp("pkg") / "qwen.pgenpkg", progress=lambda line: None)


@pytest.fixture(scope="module")
def case():
    return reference.paged_case(SPEC, LENS, NEW, seed=11)


@pytest.fixture
def copy(pkg, tmp_path) -> Path:
    """A copy of the package to damage."""
    return Path(shutil.copytree(pkg, tmp_path / pkg.name))


@pytest.fixture
def loads(monkeypatch) -> list:
    """Records every attempt to load a library; load_package must make none on a bad package."""
    calls = []
    monkeypatch.setattr(_tvm_libs, "load_tvm_runtime_libs", lambda *a, **k: calls.append(("runtime", a)))
    monkeypatch.setattr(tvm_ffi, "load_module", lambda *a, **k: calls.append(("module", a)))
    return calls


def _manifest(pkg: Path) -> dict:
    return json.loads((pkg / MANIFEST).read_text())


def _edit_manifest(pkg: Path, change) -> None:
    manifest = _manifest(pkg)
    change(manifest)
    (pkg / MANIFEST).write_text(json.dumps(manifest))


def test_manifest_lists_every_kernel_with_its_signature_and_every_file_with_its_hash(pkg):
    m = _manifest(pkg)
    assert m["format_version"] == FORMAT_VERSION and m["kv_layout"] == pgen_runtime.KV_LAYOUT
    assert AttentionSpec.from_dict(m["spec"]) == SPEC and m["spec_uri"] == SPEC.uri
    assert set(m["versions"]) == {"pgen", "tvm", "tvm_ffi"}
    (target,) = m["targets"]
    assert target["name"] == "llvm" and target["mcpu"] and (pkg / target["library"]).is_file()
    assert set(target["kernels"]) == set(KERNELS)
    for name, kernel in target["kernels"].items():
        assert kernel["symbol"] == name and kernel["provenance"] and kernel["config"]
        for arg in kernel["args"]:
            assert set(arg) == {"name", "dtype", "shape"}
    pool = {a["name"]: a for a in target["kernels"]["decode"]["args"]}["kv_pool"]
    assert pool["dtype"] == "float16" and pool["shape"][1:] == [2, 2, 16, 64] and isinstance(pool["shape"][0], str)
    files = {str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(m["files"]) == files
    assert {"lib/tvm/libtvm_runtime.so", target["library"], "README.md", f"include/pgen_{SPEC.uri}.h"} <= files
    for rel, digest in m["files"].items():
        assert hashlib.sha256((pkg / rel).read_bytes()).hexdigest() == digest, rel


def test_loaded_package_runs_all_six_kernels(pkg, case):
    kernels = load_package(pkg)
    assert kernels.spec == SPEC and kernels.device == "cpu"
    reference.assert_kernels_match(SPEC, reference.run_kernels(kernels, case), reference.expected(SPEC, case))


def _thp_mode() -> str | None:
    """Linux's transparent huge page mode (always, madvise, never), None where there is none."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def test_new_pool_is_zeroed_2mib_aligned_advised_for_huge_pages_and_runs_decode(pkg, case):
    kernels = load_package(pkg)
    big = kernels.new_pool(1000)  # 8 MB: pools below one huge page are plain numpy arrays
    assert big.shape == (1000, 2, 2, 16, 64) and big.dtype == SPEC.kv_dtype and not big.any()
    assert big.ctypes.data % HUGE_PAGE_BYTES == 0 and big.flags.c_contiguous and big.flags.writeable
    if _thp_mode() in ("always", "madvise"):
        assert huge_page_eligible(big) is True
    want = case["pool"]
    pool = kernels.new_pool(len(want))
    assert pool.shape == want.shape and pool.dtype == want.dtype and not pool.any()
    pool[...] = want
    got = np.full(case["q_decode"].shape, np.nan, case["q_decode"].dtype)
    kernels.decode(case["q_decode"], pool, case["block_tables"], case["seq_lens"], got)
    reference.assert_attention_close(SPEC, got, reference.expected(SPEC, case)["decode"], "decode")
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ConfigError, match="num_blocks"):
            kernels.new_pool(bad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_zeros_overwrite_every_chunk(pkg, dtype, monkeypatch):
    """The path a CUDA (or bfloat16) pool takes: zeroed through flat views, chunk by chunk, over
    memory that held ones; a chunk size that does not divide the tensor leaves a short last one."""
    load_package(pkg)  # TVM's runtime library, for tensors.empty
    monkeypatch.setattr(tensors, "_ZERO_CHUNK_BYTES", 1000)
    shape = (7, 3, 101)
    cpu = tensors.parse_device("cpu")
    t = tensors.empty(shape, dtype, cpu)
    ones = np.ones(shape, np.float32)
    tensors.copy_from_bytes(t, (ones.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else ones)
    assert tensors.to_numpy(t, dtype).any()
    tensors._zero_fill(t, dtype)
    assert not tensors.to_numpy(t, dtype).any()
    z = tensors.zeros(shape, dtype, cpu)
    assert tuple(z.shape) == shape and not tensors.to_numpy(z, dtype).any()


def test_to_numpy_gives_bfloat16_as_its_bits_from_any_source():
    # pgen's host form of bfloat16 is uint16 bits; TVM's RPC tensors come back as ml_dtypes values.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.array([1.0, -2.5, 2.0**100], np.float32)  # exact in bfloat16
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(tensors.to_numpy(values.astype(ml_dtypes.bfloat16), "bfloat16"), bits)
    assert np.array_equal(tensors.to_numpy(bits, "bfloat16"), bits)
    assert tensors.to_numpy(values, "float32").dtype == np.float32


def test_package_runs_in_a_process_that_never_imports_tvm(pkg, case, tmp_path):
    got, _ = reference.run_package_in(sys.executable, pkg, case, tmp_path)
    reference.assert_kernels_match(SPEC, got, reference.expected(SPEC, case))


def test_tar_package_loads_and_runs(tmp_path, case):
    tar = package(SPEC, "llvm", tmp_path / "qwen.pgenpkg", as_tar=True, progress=lambda line: None)
    assert tar.name == "qwen.pgenpkg.tar" and tar.is_file()
    reference.assert_kernels_match(SPEC, reference.run_kernels(load_package(tar), case), reference.expected(SPEC, case))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte in the kernels": (lambda p: _flip_byte(p / "targets/llvm/kernels.so"),
                                    "targets/llvm/kernels.so does not match its sha256.*Rebuild"),
    "truncated runtime library": (lambda p: (p / "lib/tvm/libtvm_runtime.so").write_bytes(b"\x7fELF"),
                                  "lib/tvm/libtvm_runtime.so does not match its sha256"),
    "edited header": (lambda p: next((p / "include").iterdir()).write_text("// edited\n"), "does not match"),
    "missing kernels": (lambda p: (p / "targets/llvm/kernels.so").unlink(),
                        "targets/llvm/kernels.so is missing.*rebuild it"),
    "missing runtime": (lambda p: shutil.rmtree(p / "lib"), "lib/tvm/libtvm_runtime.so is missing"),
    "no manifest": (lambda p: (p / MANIFEST).unlink(), "has no manifest.json"),
    "truncated manifest": (lambda p: (p / MANIFEST).write_text((p / MANIFEST).read_text()[:300]), "not valid JSON"),
    "empty manifest": (lambda p: (p / MANIFEST).write_text(""), "not valid JSON"),
    "newer format": (lambda p: _edit_manifest(p, lambda m: m.update(format_version=FORMAT_VERSION + 1)),
                     f"format version {FORMAT_VERSION + 1}.*Rebuild the package with a matching pgen"),
    "no format": (lambda p: _edit_manifest(p, lambda m: m.pop("format_version")), "format version None"),
    "other KV layout": (lambda p: _edit_manifest(p, lambda m: m.update(kv_layout="NB,HKV,2,BS,D")), "KV layout"),
    # An int8 package built before int8 codes were interleaved: its kernels read another layout.
    "int8 codes in token-row order": (lambda p: _edit_manifest(p, lambda m: [m["spec"].update(kv_dtype="int8"),
                                                                              m.update(kv_layout=KV_LAYOUT_QUANTIZED)]),
                                      "built by an older pgen: rebuild it"),
    "other machine": (lambda p: _edit_manifest(p, lambda m: m["targets"][0].update(machine="riscv64")),
                      "machine riscv64"),
    "emptied file list": (lambda p: _edit_manifest(p, lambda m: m.update(files={})), "is not listed in the manifest"),
    "unlisted library": (lambda p: _edit_manifest(p, lambda m: m["files"].pop("targets/llvm/kernels.so")),
                         "targets/llvm/kernels.so is not listed"),
    "extra file": (lambda p: (p / "targets/llvm/evil.so").write_bytes(b"x"), "evil.so is not listed"),
}


@pytest.mark.parametrize("damage, match", DAMAGE.values(), ids=list(DAMAGE))
def test_damaged_package_raises_package_error_and_loads_nothing(copy, loads, damage, match):
    damage(copy)
    with pytest.raises(PackageError, match=match):
        load_package(copy)
    assert loads == []


def test_cpu_only_package_refuses_a_cuda_device(pkg, loads):
    with pytest.raises(PackageError, match=r"has no cuda target \(it has \['llvm'\]\).*--targets cuda:sm_XX"):
        load_package(pkg, device="cuda:0")
    assert loads == []


def test_cpu_target_needing_isa_flags_this_host_lacks_is_refused(copy, loads):
    _edit_manifest(copy, lambda m: m["targets"][0].update(mcpu="futurecpu", cpu_features=["avx9000", "fma"]))
    with pytest.raises(PackageError, match=r"llvm \(futurecpu\) needs avx9000.*Rebuild the package on a host"):
        load_package(copy)
    assert loads == []


def test_a_manifest_without_cpu_features_is_checked_by_its_cpu_name(copy, loads, monkeypatch):
    monkeypatch.setitem(runtime_target.REQUIRED_BY_MCPU, "futurecpu", ("avx9000", "fma"))
    _edit_manifest(copy, lambda m: [m["targets"][0].update(mcpu="futurecpu"), m["targets"][0].pop("cpu_features")])
    with pytest.raises(PackageError, match=r"llvm \(futurecpu\) needs avx9000"):
        load_package(copy)
    assert loads == []


def test_a_build_for_this_host_needs_only_what_it_has():
    """A VM may mask extensions its CPU model implies (a Zen 4 guest without AVX-512): the build
    then targets the x86-64 level the host has, and its manifest lists only flags the host has."""
    from pgen.target import cpu_features, host_cpu_name

    assert set(cpu_features(host_cpu_name())) <= runtime_target.host_cpu_features()


def test_unknown_device_is_a_package_error(pkg, loads):
    with pytest.raises(PackageError, match="device='tpu' is not supported"):
        load_package(pkg, device="tpu")
    assert loads == []


def test_missing_package_path(tmp_path, loads):
    with pytest.raises(PackageError, match="does not exist"):
        load_package(tmp_path / "absent.pgenpkg")
    (tmp_path / "not-a-tar.pgenpkg").write_text("hello")
    with pytest.raises(PackageError, match="neither a folder nor a .tar"):
        load_package(tmp_path / "not-a-tar.pgenpkg")
    assert loads == []


@pytest.mark.cuda
def test_fat_package_lists_every_kernel_per_target(tmp_path, cuda_toolchain):
    fat = package(SPEC, "llvm,cuda:sm_80,sm_90", tmp_path / "fat.pgenpkg", progress=lambda line: None)
    m = _manifest(fat)
    assert [t["name"] for t in m["targets"]] == ["llvm", "cuda:sm_80,sm_90"]
    for target in m["targets"]:
        assert set(target["kernels"]) == set(KERNELS), target["name"]
        assert all(k["args"] for k in target["kernels"].values())
        assert target["library"] in m["files"]
    cuda = m["targets"][1]
    assert cuda["archs"] == ["sm_80", "sm_90"] and cuda["ptx_arch"] == "sm_90"
    assert sorted(cuda["sass"]) == ["sm_80", "sm_90"]
    for arch in ("sm_80", "sm_90"):
        assert f"targets/cuda-sm_80-sm_90/kernels.{arch}.cubin" in m["files"]
    assert any(p.endswith("libtvm_runtime_cuda.so") for p in m["runtime_libs"]["cuda"])
    assert all(p in m["files"] for p in m["runtime_libs"]["cpu"] + m["runtime_libs"]["cuda"])
    reference.assert_kernels_match(SPEC, reference.run_kernels(load_package(fat), reference.paged_case(SPEC, LENS, NEW)),
                                   reference.expected(SPEC, reference.paged_case(SPEC, LENS, NEW)))
