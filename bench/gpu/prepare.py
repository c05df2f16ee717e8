"""The GPU check, build-host half: gather into .gpu/ everything bench/gpu/check.py needs on the GPU.

- packages/: fat pgen packages (llvm + sm_80 + sm_90) for Llama-3-8B and Qwen2.5-0.5B shapes,
  fp16 and bf16; the other specs in fp16; decode with `group_rows`; CUDA extend on tensor cores
  (CudaExtendMma) for every spec. The TVM runtime libraries travel in the first package only (run.sh
  copies them back: they are the same files, so the manifests' hashes still hold);
- bundles/: offline tuning bundles for the entries of --tune (`spec[@dtype][/kernel+kernel]`);
  runtime libraries likewise in the first bundle only. A spec with an H200 log gets the default
  and configs one knob away from that log's fastest (`emit_bundle`'s `refine_from`; `--sample`
  for a fresh sample instead);
- models/: the tiny model compiled for cuda:sm_80,sm_90 with float32 and float16 weights, with
  onnxruntime's greedy tokens and logits for a few prompts (run here: the device has no
  onnxruntime) and the weights for the torch baseline (`model_check.py`); and REAL_MODELS,
  transformers models exported by optimum / torch dynamo, with their onnxruntime references;
- runtime/: the pgen_runtime sources (the device has no pgen and no apache-tvm);
- wheels/: apache-tvm-ffi for the device's Python 3.12.

Then run bench/gpu/run.sh there (one command, well under 10 minutes), bring $OUT back, and ingest
the tuning results with `pgen tune --ingest OUT/tune_<bundle>.json --bundle .gpu/bundles/<bundle>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TVM_FFI = "apache-tvm-ffi==0.1.14.post0"
SPECS = ("llama3-8b", "qwen2.5-0.5b")
# Checked in fp16 only: sliding window, soft-cap, head_dim 256 and 96 (a non-power-of-two lane count).
EXTRA_SPECS = ("mistral-7b", "gemma2-9b", "phi3-mini")
# What the H200 logs lack after a change of the CUDA templates: decode (tensor-core kernel) and
# extend (the CUDA-core template it shares) records for every spec with a log.
TUNE = ("llama3-8b", "qwen2.5-0.5b", "mistral-7b", "gemma2-9b", "phi3-mini", "llama3-8b@bfloat16")
# Tensor-core extend (CudaExtendMma) in configs other than the defaults the plain packages build
# with: (spec, dtype, query tokens per block, keys per tile, output in accumulators).
MMA_CHECKS = (("llama3-8b", "float16", 16, 64, 1), ("llama3-8b", "float16", 32, 32, 1),
              ("llama3-8b", "bfloat16", 16, 16, 0), ("qwen2.5-0.5b", "float16", 32, 16, 1),
              ("mistral-7b", "float16", 16, 16, 0), ("gemma2-9b", "float16", 16, 32, 0), ("phi3-mini", "float16", 16, 16, 1))
# Decode beside the plain packages' default (CudaDecodeMma, 4 warps per block): the CUDA-core
# kernel (timed side by side with it), other warp counts, split caps and dtypes, and mma_prefetch
# other than the default (timed too). The package tag names the override (check.py times some).
SIMT, MMA = {"rule": "CudaDecodeSimt"}, {"rule": "CudaDecodeMma"}
DECODE_CHECKS = (("llama3-8b", "float16", "mma0", SIMT), ("llama3-8b", "float16", "mma_warps1", {**MMA, "mma_warps": 1}),
                 ("llama3-8b", "float16", "mma_prefetch0", {**MMA, "mma_prefetch": 0}),
                 ("llama3-8b", "float16", "mma_warps1-mma_prefetch0", {**MMA, "mma_warps": 1, "mma_prefetch": 0}),
                 ("qwen2.5-0.5b", "float16", "mma_prefetch1", {**MMA, "mma_prefetch": 1}),
                 ("mistral-7b", "bfloat16", "mma_warps2-mma_prefetch1", {**MMA, "mma_warps": 2, "mma_prefetch": 1}),
                 ("llama3-8b", "bfloat16", "mma_warps8-max_splits8", {**MMA, "mma_warps": 8, "max_splits": 8}),
                 ("qwen2.5-0.5b", "float16", "mma_warps2", {**MMA, "mma_warps": 2}),
                 ("mistral-7b", "float16", "mma_warps8", {**MMA, "mma_warps": 8}),
                 ("phi3-mini", "float16", "mma_warps2", {**MMA, "mma_warps": 2}))
# Real exports in the model section (fp32 CUDA packages, tokens against onnxruntime): Gemma-2's
# soft-cap and local/global windows, Mistral's sliding window, GPT-2's learned positions.
REAL_MODELS = (("gemma2", "optimum"), ("mistral", "dynamo"), ("gpt2", "optimum"))
# GQA groups past 8 query heads use the fragments' second 8 rows (no shipped spec has one).
WIDE_GROUPS = ((48, 4, 128, "float16"), (64, 4, 64, "bfloat16"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / ".gpu"))
    parser.add_argument("--trials", type=int, default=24, help="tuning candidates per kernel")
    parser.add_argument("--tune", default=",".join(TUNE),
                        help="comma list of specs/<name>.toml to build tuning bundles for, each as "
                             "name[@dtype][/kernel+kernel] (all tunable kernels by default; '' for none)")
    parser.add_argument("--no-models", action="store_true", help="skip the CUDA model packages (models/)")
    parser.add_argument("--sample", action="store_true",
                        help="bundle a seeded sample even where an H200 log could be refined")
    args = parser.parse_args()

    import pgen
    from pgen.package import package
    from pgen.tune import TUNABLE, emit_bundle

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "packages").mkdir(parents=True)
    for name in SPECS:
        base = pgen.load_spec(REPO / "specs" / f"{name}.toml")
        for dtype in ("float16", "bfloat16"):
            spec = dataclasses.replace(base, dtype=dtype, kv_dtype=dtype)
            package(spec, "llvm,cuda:sm_80,sm_90", out / "packages" / f"{name}-{dtype}.pgenpkg",
                    progress=lambda line: print(line.splitlines()[0], flush=True))
    # The CUDA-core decode with one thread serving a whole GQA group (group_rows).
    for name, rows in (("llama3-8b", 4), ("qwen2.5-0.5b", 7)):
        spec = dataclasses.replace(pgen.load_spec(REPO / "specs" / f"{name}.toml"), dtype="float16", kv_dtype="float16")
        package(spec, "llvm,cuda:sm_90", out / "packages" / f"{name}-float16-group{rows}.pgenpkg",
                progress=lambda line: print(line.splitlines()[0], flush=True), overrides={"decode": {**SIMT, "group_rows": rows}})
    for name in EXTRA_SPECS:
        package(pgen.load_spec(REPO / "specs" / f"{name}.toml"), "llvm,cuda:sm_90", out / "packages" / f"{name}.pgenpkg",
                progress=lambda line: print(line.splitlines()[0], flush=True))
    for name, dtype, tokens, keys, in_regs in MMA_CHECKS:
        spec = dataclasses.replace(pgen.load_spec(REPO / "specs" / f"{name}.toml"), dtype=dtype, kv_dtype=dtype)
        package(spec, "cuda:sm_90", out / "packages" / f"{name}-{dtype}-mma{tokens}k{keys}o{in_regs}.pgenpkg",
                progress=lambda line: print(line.splitlines()[0], flush=True),
                overrides={"extend": {"rule": "CudaExtendMma", "q_tile": tokens, "mma_keys": keys, "mma_o": in_regs}})
    for name, dtype, tag, override in DECODE_CHECKS:
        spec = dataclasses.replace(pgen.load_spec(REPO / "specs" / f"{name}.toml"), dtype=dtype, kv_dtype=dtype)
        package(spec, "cuda:sm_90", out / "packages" / f"{name}-{dtype}-decode-{tag}.pgenpkg",
                progress=lambda line: print(line.splitlines()[0], flush=True), overrides={"decode": override})
    for hq, hkv, d, dtype in WIDE_GROUPS:
        spec = pgen.AttentionSpec(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=16, dtype=dtype)
        package(spec, "cuda:sm_90", out / "packages" / f"wide-{spec.uri}.pgenpkg",
                progress=lambda line: print(line.splitlines()[0], flush=True))
    if not args.no_models:
        prepare_models(out)
    # The carry is size-limited: packages after the first travel without the runtime libraries.
    for pkg in [*sorted((out / "packages").glob("*.pgenpkg"))[1:], *sorted((out / "models").glob("*.pgenpkg"))]:
        shutil.rmtree(pkg / "lib")
    libs = None
    for entry in filter(None, args.tune.split(",")):
        name, _, kernels = entry.partition("/")
        name, _, dtype = name.partition("@")
        spec = pgen.load_spec(REPO / "specs" / f"{name}.toml")
        if dtype:
            spec = dataclasses.replace(spec, dtype=dtype, kv_dtype=dtype)
        log = REPO / "tuning_logs" / "cuda-sm_90-nvidia-h200" / f"{spec.uri}.json"
        bundle = emit_bundle(spec, "cuda:sm_90", out / "bundles" / spec.uri, trials=args.trials,
                             kernels=tuple(kernels.split("+")) if kernels else TUNABLE,
                             progress=lambda line: print(line, flush=True),
                             refine_from=log if log.is_file() and not args.sample else None)
        # The carry is size-limited: later bundles borrow the first one's runtime libraries.
        if libs is None:
            libs = bundle / "lib"
        else:
            shutil.rmtree(bundle / "lib")
    shutil.copytree(REPO / "runtime" / "pgen_runtime", out / "runtime" / "pgen_runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(out / "wheels"), TVM_FFI], check=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB ready; on the GPU run: bash bench/gpu/run.sh")
    return 0


def prepare_models(out: Path) -> None:
    """models/: the tiny model's CUDA packages, onnxruntime's reference run, the torch weights."""
    import json

    import numpy as np

    from pgen import tiny
    from pgen.onnx import compile_model
    from pgen_runtime.verify import default_prompts

    models = out / "models"
    models.mkdir(parents=True)
    config = tiny.TinyConfig()
    onnx_path = tiny.export(out / "tiny.onnx")
    for weights in ("float32", "float16"):
        compile_model(onnx_path, models / f"tiny-cuda-{weights}.pgenpkg", target="cuda:sm_80,sm_90",
                      weight_dtype=weights, progress=lambda line: print(line.splitlines()[0], flush=True))
    write_reference(onnx_path, default_prompts(config.vocab, None), models / "reference.json")
    (models / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    np.savez(models / "weights.npz", **tiny.weights(config))
    # Real exports of transformers models (random weights, the test matrix's configs): a soft-cap
    # with local/global windows, a sliding window, learned positions. Correctness only.
    sys.path.insert(0, str(REPO / "tests" / "models"))
    import hf_models

    with tempfile.TemporaryDirectory() as exports:
        for family, exporter in REAL_MODELS:
            path = hf_models.export(family, exporter, "sdpa", exports)
            package = compile_model(path, models / f"{family}-{exporter}-cuda-float32.pgenpkg",
                                    target="cuda:sm_80,sm_90", progress=lambda line: print(line.splitlines()[0], flush=True))
            manifest = json.loads((package / "manifest.json").read_text())
            windows = [w for w in (layer.get("sliding_window") for layer in manifest["model"]["layers"]) if w]
            prompts = default_prompts(manifest["model"]["vocab_size"], min(windows) if windows else None)
            write_reference(path, prompts, models / f"{family}-{exporter}-cuda-float32.reference.json")


def write_reference(onnx_path: Path, prompts: list[list[int]], out: Path, tokens: int = 16) -> None:
    """onnxruntime's greedy tokens of each prompt and the logits of its first step, as JSON."""
    import json

    from pgen_runtime.verify import ort_generate

    refs = [ort_generate(onnx_path, p, tokens) for p in prompts]
    out.write_text(json.dumps({"prompts": [{"prompt": p, "tokens": r.tokens, "logits": [r.logits[0].tolist()]}
                                           for p, r in zip(prompts, refs)]}))


if __name__ == "__main__":
    sys.exit(main())
