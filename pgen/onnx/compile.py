"""`compile_model`: ONNX decoder export -> rewritten graph -> Relax -> model library -> package.

The package is a kernel package (`pgen.package` format: kernels, TVM runtime libraries, manifest
with hashes) plus, per target, `model.so` (the Relax VM executable, weights embedded as constants)
and a `model` section in the manifest that `pgen_runtime.LLM` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import onnx
from onnx import helper

from pgen_runtime.errors import BuildError, ConfigError, ModelImportError, SpecError
from pgen_runtime.spec import KV_DTYPES, AttentionSpec
from pgen_runtime.tokenizer import TOKENIZER_FILE

from ..build import build_library, choose_configs
from ..package import assemble, publish
from ..schedules import cpu_dense
from ..target import parse_targets
from .relax_import import build_executable, import_model
from .rewrite import Rewritten, rewrite
from .weights import WEIGHT_DTYPES, WEIGHT_DTYPES_BY_KIND

MODEL_LIBRARY = "model.so"


def compiler_version() -> str:
    """A hash of the code and versions that compile a model: a package records it in its manifest.

    `pgen run` rebuilds its cached default package when this changes, so a cached model never
    keeps the schedules of older pgen code.
    """
    from .. import build

    h = hashlib.sha256(json.dumps(build.versions(), sort_keys=True).encode())
    for path in [*build._SOURCES, *sorted(Path(__file__).parent.glob("*.py"))]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def layer_specs(rewritten: Rewritten, block_size: int, kv_dtype: str | None = None) -> list[AttentionSpec]:
    """The AttentionSpec of every layer: one shape, scale and dtype, windows may differ (Gemma-2's
    local and global layers).

    Raises:
        ModelImportError: layers differ in heads, head_dim, scale, soft-cap or dtype, or a spec is invalid.
    """
    specs = []
    for layer in rewritten.layers:
        try:
            specs.append(AttentionSpec(layer.num_q_heads, layer.num_kv_heads, layer.head_dim, block_size,
                                       layer.dtype, kv_dtype=kv_dtype, scale=layer.scale,
                                       logit_softcap=layer.softcap, sliding_window=layer.window))
        except Exception as err:
            raise ModelImportError(f"layer {layer.index} ({layer.core.op_type} {layer.out!r}): {err}") from err
    shapes = {dataclasses.replace(s, sliding_window=None) for s in specs}
    if len(shapes) != 1:
        raise ModelImportError(f"layers need different attention specs {sorted(s.uri for s in shapes)}; "
                               "pgen builds one shape, scale and dtype per model")
    return specs


def model_spec(specs: list[AttentionSpec]) -> AttentionSpec:
    """The spec of the package's kernel library: the layers' own where they agree, else without a
    window (the pool layout, block copies and swaps do not depend on it)."""
    return specs[0] if len(set(specs)) == 1 else dataclasses.replace(specs[0], sliding_window=None)


def compile_model(model_path: str | Path, out: str | Path, target: str = "llvm", block_size: int = 16,
                  eos_token_id: int | None = None, name: str | None = None, tokenizer: str | Path | None = None,
                  sliding_window: int | None = None, bounds_checks: bool = False, verify: bool = True,
                  kv_dtype: str | None = None, weight_dtype: str = "float32", progress=print) -> Path:
    """Compile an ONNX decoder export (past/present KV) into a package served by `pgen_runtime.LLM`.

    Args:
        model_path: the .onnx file.
        out: the package folder to write, NAME.pgenpkg (its parent must exist).
        target: `llvm`, `cuda:sm_80,sm_90`, or both (`llvm,cuda:sm_80,sm_90`): one model library
            and kernel library per target. A CUDA target's dense layers are scheduled by TVM's
            dlight GPU rules, its attention is pgen's CUDA kernels on a pool in device memory.
        block_size: tokens per KV block.
        eos_token_id: stop token; defaults to the export's (`export_eos_token_id`), else none.
        name: package name (default: the folder's name without suffix).
        tokenizer: a HF `tokenizers` JSON file to ship as the package's tokenizer.json; without it
            the runtime uses a byte-level tokenizer over the model's vocabulary.
        sliding_window: every layer's window (0: none); default: what each layer's mask builds.
        bounds_checks: build the model and its kernels with a check on every buffer access, which
            raises (naming the buffer and index) instead of reading out of bounds; for tests.
        verify: run the export with onnxruntime and the compiled model on a few prompts (a mixed
            batch, prefill and decode) and refuse to write a package whose logits disagree. A CUDA
            target is verified on its GPU host (`python -m pgen_runtime.verify`).
        kv_dtype: the KV cache's dtype (default: the model's); "int8" or "fp8_e4m3" store one-byte
            codes with a scale per cached (token, head) row, about half of fp16's bytes (CPU only).
        weight_dtype: "bfloat16" (llvm) rounds the weights of the dense layers (matmuls with a
            constant weight) and the activations entering them to bf16, accumulating in fp32: half
            the weight bytes, and twice the multiply rate where the CPU has AVX-512 BF16.
            "int8" (llvm, AVX-512 VNNI) quantizes those weights per output column and their inputs
            per token row to int8, int32 sums by vpdpbusd, rescaled in the epilogue (W8A8).
            "float16" (CUDA) runs those matmuls on fp16 operands on tensor cores, fp32 accumulation.
        progress: called with one line of text per step.

    Returns:
        The package path.

    Raises:
        ModelImportError: the graph cannot be rewritten to the paged cache (names the node), or
            the compiled model disagrees with onnxruntime (names the prompt, step and layer).
        ConfigError: `tokenizer` is unreadable or has ids past the model's vocabulary.
        BuildError: compiling the model or the kernels failed. PackageError: cannot write `out`.
    """
    model_path, out = Path(model_path), Path(out)
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    targets = [dataclasses.replace(t, bounds_checks=bounds_checks) for t in parse_targets(target)]
    if bounds_checks and any(t.kind == "cuda" for t in targets):
        raise ConfigError("bounds_checks builds llvm targets only (CUDA code has no checked accesses); "
                          "drop --bounds-checks or build --target llvm")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise SpecError(f"kv_dtype={kv_dtype!r} is not supported; use one of {', '.join(KV_DTYPES)}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise SpecError(f"weight_dtype={weight_dtype!r} is not supported; use one of {', '.join(WEIGHT_DTYPES)}")
    for t in targets:
        if weight_dtype not in WEIGHT_DTYPES_BY_KIND[t.kind]:
            raise SpecError(f"weight_dtype={weight_dtype!r} does not build for {t.name}; its weight dtypes are "
                            f"{', '.join(WEIGHT_DTYPES_BY_KIND[t.kind])} (compile one package per target for others)")
        if weight_dtype == "int8" and not cpu_dense.has_vnni(t.info):
            raise SpecError(f"weight_dtype='int8' needs AVX-512 VNNI (vpdpbusd), which this host's CPU "
                            f"({t.mcpu}) lacks; use --weight-dtype bfloat16 or float32 here, or compile on a "
                            "host with avx512_vnni for hosts that have it")
    source = onnx.load(str(model_path))
    rewritten = rewrite(source, block_size, sliding_window, kv_dtype)
    specs = layer_specs(rewritten, block_size, kv_dtype)
    spec = model_spec(specs)
    if tokenizer is not None:
        check_tokenizer(tokenizer, rewritten.vocab_size)
    windows = sorted({str(s.sliding_window) for s in specs})
    progress(f"{model_path.name}: {len(rewritten.layers)} layers, spec {spec.uri}, windows {', '.join(windows)}, "
             f"vocab {rewritten.vocab_size}")
    if eos_token_id is None:
        eos_token_id = export_eos_token_id(source, model_path)
    del source
    modules = []
    for build_target in targets:
        configs = {n: c.config for n, c in choose_configs(spec, build_target).items()}
        modules.append(import_model(rewritten.model, spec, build_target, configs))
    # The weights live on as the modules' constants: the ONNX copies of them go (a 0.5B model's
    # export is 2 GB; the compile's peak memory is several copies of it).
    del rewritten.model.graph.initializer[:]
    built = []  # per target: (kernel library, model executable, model cubins)
    for build_target in targets:
        executable, cubins = build_executable(modules.pop(0), build_target, weight_dtype)
        kernels = build_library(spec, build_target)
        progress(kernels.summary())
        built.append((kernels, executable, cubins))

    def fill(root: Path) -> dict:
        manifest = assemble(spec, [k for k, _, _ in built], root, name or out.name.split(".")[0])
        for target_entry, (_, executable, cubins) in zip(manifest["targets"], built):
            library = Path(target_entry["library"]).with_name(MODEL_LIBRARY)
            executable.export_library(str(root / library))
            target_entry["model_library"] = str(library)
            if cubins:
                target_entry["model_sass"] = model_sass(cubins, target_entry["archs"])
        manifest["model"] = _model_section(rewritten, specs, eos_token_id, model_path)
        manifest["model"]["weight_dtype"] = weight_dtype
        if tokenizer is not None:
            shutil.copyfile(tokenizer, root / TOKENIZER_FILE)
        manifest["model"]["tokenizer"] = TOKENIZER_FILE if tokenizer is not None else "byte-level"
        return manifest

    def check(root: Path) -> None:
        from pgen_runtime.verify import verify as verify_package

        if any(t.kind == "llvm" for t in targets):
            verify_package(root, model_path, progress=progress)
        unverified = [t.name for t in targets if t.kind == "cuda"]
        if unverified:
            progress(f"{', '.join(unverified)}: not verified here (this process compiles with TVM, which cannot "
                     f"load a CUDA package beside it); on the GPU host run `python -m pgen_runtime.verify "
                     f"{out} {model_path.name} --device cuda:0`")

    return publish(out, fill, progress=progress, check=check if verify else None)


def model_sass(cubins: dict[str, bytes], archs: list[str]) -> dict[str, list[dict]]:
    """Per arch, the SASS resources of every kernel of a model's device code (cuobjdump).

    Raises:
        BuildError: an arch of the target has no SASS in the model's cubins.
    """
    from .. import cuda

    report = {}
    for arch, cubin in sorted(cubins.items()):
        report[arch] = [{"name": k.name, "registers": k.registers, "shared_bytes": k.shared_bytes,
                         "local_bytes": k.local_bytes, "local_stores": k.local_stores, "local_loads": k.local_loads,
                         "mma_instructions": k.mma_instructions}
                        for k in cuda.sass_report(cubin).get(arch, [])]
    missing = [a for a in archs if not report.get(a)]
    if missing:
        raise BuildError(f"the model's device code has no SASS for {missing}; check that nvcc builds those archs")
    return report


def export_eos_token_id(source: onnx.ModelProto, model_path: Path) -> int | None:
    """The stop token an export declares: its `eos_token_id` metadata, else the
    generation_config.json or config.json that optimum writes beside model.onnx (the first id
    where it lists several)."""
    meta = {p.key: p.value for p in source.metadata_props}
    if "eos_token_id" in meta:
        return int(meta["eos_token_id"])
    for name in ("generation_config.json", "config.json"):
        path = model_path.with_name(name)
        try:
            value = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    return None


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """Reject a tokenizer file the runtime could not load or whose ids the model cannot produce.

    Raises:
        ConfigError: names the file and the fix.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ConfigError(f"tokenizer={path}: checking it needs the `tokenizers` package; pip install "
                          "tokenizers (the serving host needs it too)") from err
    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # tokenizers raises its own Exception subclasses
        raise ConfigError(f"tokenizer={path} is not a readable HF tokenizers JSON file ({err}); pass the "
                          "model's tokenizer.json") from None
    if size > vocab_size:
        raise ConfigError(f"tokenizer={path} has {size} ids but the model's vocabulary has {vocab_size}; pass "
                          "the tokenizer this model was trained with")


def _model_section(rewritten: Rewritten, specs: list[AttentionSpec], eos_token_id: int | None,
                   source: Path) -> dict:
    graph = rewritten.model.graph

    def io(values):
        return [{"name": v.name,
                 "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {
        "inputs": io(graph.input),
        "outputs": io(graph.output),
        "logits": "logits[b] belongs to row logits_indices[b] of the flattened token batch",
        "num_layers": len(rewritten.layers),
        "layers": [s.to_dict() for s in specs],
        "vocab_size": rewritten.vocab_size,
        "eos_token_id": eos_token_id,
        "has_positions": rewritten.has_positions,
        "max_positions": rewritten.max_positions,
        "weights": "embedded as constants in model.so",
        "compiler": compiler_version(),
        "source": {"file": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest()},
    }
