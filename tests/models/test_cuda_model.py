"""`compile-model --target cuda:...`: a CUDA model package built here (no GPU), its SASS, and
the runtime's refusal on a host without a GPU.

What runs the package (tokens against onnxruntime on a GPU) is bench/gpu/check.py's model section.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgen import tiny
from pgen.onnx import compile_model
from pgen_runtime.errors import ConfigError, SpecError

ARCHS = ["sm_80", "sm_90"]
CUDA = "cuda:" + ",".join(ARCHS)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return tiny.export(tmp_path_factory.mktemp("cuda-model") / "tiny.onnx")


@pytest.fixture(scope="module")
def packages(cuda_toolchain, tiny_onnx, tmp_path_factory) -> dict[str, Path]:
    """The tiny model for CUDA with float32 and float16 weights, and one fat llvm + CUDA package."""
    root = tmp_path_factory.mktemp("cuda-packages")
    quiet = lambda line: None  # noqa: E731
    return {
        "float32": compile_model(tiny_onnx, root / "tiny-cuda.pgenpkg", target=CUDA, progress=quiet),
        "float16": compile_model(tiny_onnx, root / "tiny-cuda-fp16.pgenpkg", target=CUDA, weight_dtype="float16",
                                 progress=quiet),
        "fat": compile_model(tiny_onnx, root / "tiny-fat.pgenpkg", target="llvm," + CUDA, progress=quiet),
    }


def _cuda_target(package: Path) -> dict:
    manifest = json.loads((package / "manifest.json").read_text())
    (target,) = [t for t in manifest["targets"] if t["kind"] == "cuda"]
    return target


@pytest.mark.cuda
@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_cuda_model_has_sass_for_every_arch(packages, weights):
    from pgen import cuda

    package = packages[weights]
    target = _cuda_target(package)
    assert target["archs"] == ARCHS and target["model_library"] == "targets/cuda-sm_80-sm_90/model.so"
    # What cuobjdump reads from the shipped model.so itself, not only what the manifest says.
    (fatbin,) = cuda.find_fatbins((package / target["model_library"]).read_bytes())
    report = cuda.sass_report(fatbin)
    assert sorted(report) == ARCHS
    for arch in ARCHS:
        names = {k.name for k in report[arch]}
        assert names == {k["name"] for k in target["model_sass"][arch]}
        # pgen's own attention kernels, and dlight's matmuls with their fused epilogues.
        assert {"pgen_cache_write_kernel", "pgen_extend_kernel"} <= names
        matmuls = [k for k in report[arch] if "matmul" in k.name]
        assert len(matmuls) >= 5, names
        tensor_core = [k.name for k in matmuls if k.mma_instructions]
        if weights == "float32":
            assert tensor_core == []
        else:
            # Every projection wider than dlight's tensorize threshold (64) runs on tensor cores:
            # Q/O (128), gate/up (256 with the SiLU epilogue), down, LM head (259); K/V (64) do not.
            assert len(tensor_core) >= 5 and any("sigmoid" in n for n in tensor_core), tensor_core
    model = json.loads((package / "manifest.json").read_text())["model"]
    assert model["weight_dtype"] == weights


@pytest.mark.cuda
def test_fat_package_serves_its_cpu_target(packages):
    """llvm + CUDA in one package: the CPU half was verified against onnxruntime when written, and
    runs here; the CUDA half is the same build as the CUDA-only package."""
    from pgen_runtime import LLM, SamplingParams

    manifest = json.loads((packages["fat"] / "manifest.json").read_text())
    assert [t["kind"] for t in manifest["targets"]] == ["llvm", "cuda"]
    assert all("model_library" in t for t in manifest["targets"])
    llm = LLM(packages["fat"])
    (out,) = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 4


def _in_fresh_process(script: str, stub_driver: bool) -> str:
    """Run `script` where no tvm was imported (a serving host), with the build stub standing in
    for libcuda.so.1 or with no driver at all; returns its stdout."""
    from pgen import cuda

    prelude = ""
    if stub_driver:
        prelude = f"import ctypes; ctypes.CDLL({str(cuda._stub_libcuda())!r}, mode=ctypes.RTLD_GLOBAL)\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "tvm" not in proc.stdout.split("modules:")[-1]
    return proc.stdout


_REFUSE = """
    import sys
    from pgen_runtime import LLM, PackageError
    try:
        LLM({package!r}, device="cuda:0")
    except PackageError as err:
        print("refused:", err)
    print("modules:", sorted(m for m in sys.modules if m == "tvm" or m.startswith("tvm.")))
"""


@pytest.mark.cuda
@pytest.mark.parametrize("stub_driver", [False, True], ids=["no-driver", "driver-without-gpu"])
def test_cuda_package_is_refused_without_a_gpu(packages, stub_driver):
    out = _in_fresh_process(_REFUSE.format(package=str(packages["float32"])), stub_driver)
    assert "refused:" in out
    if stub_driver:  # the driver loads but has no device
        assert "no CUDA device cuda:0" in out
    else:
        assert "libcuda.so.1" in out and "install an NVIDIA driver" in out


@pytest.mark.cuda
def test_cuda_model_library_loads_without_tvm(packages):
    """The serving host's half that runs without a GPU: model.so and its VM load with apache-tvm-ffi
    and the package's runtime libraries only (the driver here is the build stub)."""
    package = packages["float16"]
    script = f"""
        import sys
        from pathlib import Path
        import tvm_ffi
        from pgen_runtime._tvm_libs import load_tvm_runtime_libs
        root = Path({str(package)!r})
        load_tvm_runtime_libs(root / "lib" / "tvm", cuda=True)
        executable = tvm_ffi.load_module(str(root / "targets/cuda-sm_80-sm_90/model.so"))
        vm = executable["vm_load_executable"]()
        print("loaded", sorted(m.kind for m in executable.imports))
        print("modules:", sorted(m for m in sys.modules if m == "tvm" or m.startswith("tvm.")))
    """
    out = _in_fresh_process(script, stub_driver=True)
    assert "loaded" in out, out


def test_cpu_package_is_refused_on_cuda():
    """A CPU-only model package asked for cuda:0 names the rebuild, before anything loads."""
    from pgen.run import default_package
    from pgen_runtime import LLM, PackageError

    with pytest.raises(PackageError, match=r"no cuda target .*--targets cuda:sm_XX"):
        LLM(default_package(progress=lambda line: None), device="cuda:0")


def test_serve_on_cuda_refuses_a_cpu_package(capsys):
    from pgen.run import default_package
    from pgen_runtime import server

    assert server.main([str(default_package(progress=lambda line: None)), "--device", "cuda:0"]) == 2
    assert "no cuda target" in capsys.readouterr().err


def test_weight_dtype_and_bounds_checks_name_their_target(tiny_onnx, tmp_path):
    with pytest.raises(SpecError, match=r"weight_dtype='float16' does not build for llvm.*float32, bfloat16"):
        compile_model(tiny_onnx, tmp_path / "a.pgenpkg", target="llvm", weight_dtype="float16")
    with pytest.raises(SpecError, match=r"weight_dtype='bfloat16' does not build for cuda:sm_80"):
        compile_model(tiny_onnx, tmp_path / "b.pgenpkg", target="cuda:sm_80", weight_dtype="bfloat16")
    with pytest.raises(ConfigError, match="bounds_checks builds llvm targets only"):
        compile_model(tiny_onnx, tmp_path / "c.pgenpkg", target="llvm,cuda:sm_80", bounds_checks=True)
    assert not any(tmp_path.glob("*.pgenpkg"))


def test_gpu_model_section_runs_on_a_cpu_package(tiny_onnx, tmp_path, monkeypatch):
    """bench/gpu's model section, dry-run on the CPU: its torch decoder reproduces onnxruntime's
    tokens, and its checks pass on a CPU package of the same model (what the lent GPU runs is then
    only the device)."""
    torch = pytest.importorskip("torch")
    gpu_dir = Path(__file__).resolve().parents[2] / "bench" / "gpu"
    monkeypatch.syspath_prepend(str(gpu_dir))
    import model_check
    import prepare

    models = tmp_path / "models"
    models.mkdir(parents=True)
    compile_model(tiny_onnx, models / "tiny-cpu.pgenpkg", progress=lambda line: None)
    from pgen_runtime.verify import default_prompts

    config = tiny.TinyConfig()
    prepare.write_reference(tiny_onnx, default_prompts(config.vocab, None)[:2], models / "reference.json", tokens=8)
    (models / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    weights = tiny.weights(config)
    baseline = model_check.TorchTiny(weights, dataclasses.asdict(config), "cpu", torch.float32)
    for ref in json.loads((models / "reference.json").read_text())["prompts"]:
        assert baseline.generate(torch.tensor([ref["prompt"]]), 8)[0].tolist() == ref["tokens"]
    import numpy as np

    np.savez(models / "weights.npz", **weights)
    # A package with its own reference (a real export's) is checked against it and not timed.
    import shutil

    shutil.copytree(models / "tiny-cpu.pgenpkg", models / "other.pgenpkg")
    shutil.copy(models / "reference.json", models / "other.reference.json")
    monkeypatch.setattr(model_check, "BATCHES", (2,))
    report = model_check.check_models(models, "cpu")
    modes = ["alone", "batch", "swap + copy-on-write", "first-step logits"]
    assert [(c["package"], c["mode"]) for c in report["checks"]] == [
        *((name, mode) for name in ("other.pgenpkg", "tiny-cpu.pgenpkg") for mode in modes)]
    assert all(c["ok"] for c in report["checks"]), report["checks"]
    (timing,) = report["timings"]
    assert timing["batch"] == 2 and timing["pgen_tok_s"] > 0 and timing["torch_tok_s"] > 0


@pytest.mark.cuda
def test_cuda_pipeline_builds_a_concat_with_an_empty_operand(cuda_toolchain):
    """A rotary over the whole head concatenates an empty pass-through slice (Phi-3's optimum
    export); dlight's GPU fallback divided by its zero extent until the pipeline dropped it."""
    import tvm
    from tvm import relax

    from pgen import cuda
    from pgen.onnx.relax_import import cuda_model_pipeline
    from pgen.target import parse_targets

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("n", "int64"), 32], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            rest = bb.emit(relax.op.strided_slice(x, [1], [32], [32]))  # [n, 0]
            out = bb.emit_output(relax.op.concat([relax.op.multiply(x, relax.const(2.0)), rest], 1))
        bb.emit_func_output(out)
    (target,) = parse_targets("cuda:sm_80")
    _, cubins = cuda.build_cuda(bb.get(), ("sm_80",), relax_pipeline=cuda_model_pipeline(target))
    assert set(cubins) == {"sm_80"}
