"""`pgen run`: build (or reuse) the default tiny model package, generate a batch, report KV and speed.

The default model is `pgen.tiny`'s LLaMA-style decoder, compiled for the CPU and cached under
$PGEN_CACHE_DIR (default ~/.cache/pgen)/models; a damaged cached package is rebuilt.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from pgen_runtime import LLM, SamplingParams
from pgen_runtime.errors import PackageError
from pgen_runtime.package import read_manifest

from .tiny import TinyConfig, export

# The shared opening spans two 16-token blocks, so the later prompts hit the prefix cache.
SYSTEM = "pgen demo. Answer in one line:  "
DEFAULT_PROMPTS = (f"{SYSTEM}What is a paged KV cache?", f"{SYSTEM}Why batch continuously?",
                   f"{SYSTEM}What does copy-on-write save?", "Hello, tiny model!")


def models_root() -> Path:
    return Path(os.environ.get("PGEN_CACHE_DIR", Path.home() / ".cache" / "pgen")) / "models"


def default_package(config: TinyConfig = TinyConfig(), progress=print, weight_dtype: str = "float32") -> Path:
    """The default tiny model's package: reused when it is intact, else exported and compiled.

    Args:
        progress: called with one line per build step.
        weight_dtype: the dense layers' weights (`compile_model`); bfloat16 is its own package.
    """
    from .onnx import compile_model
    from .onnx.compile import compiler_version

    root = models_root()
    package = root / f"{config.name}{'' if weight_dtype == 'float32' else '-' + weight_dtype}.pgenpkg"
    if package.is_dir():
        try:
            _, manifest = read_manifest(package)
            if manifest.get("model", {}).get("compiler") == compiler_version():
                progress(f"reusing {package}")
                return package
            progress(f"rebuilding {package}: it was compiled by other pgen code or TVM versions")
        except PackageError as err:
            progress(f"rebuilding {package}: {err}")
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        progress(f"[1/2] writing the ONNX graph of {config.name} (deterministic weights)")
        onnx_path = export(Path(tmp) / f"{config.name}.onnx", config)
        progress("[2/2] compiling it for the CPU (llvm): rewrite to the paged cache, Relax, kernels, package")
        compile_model(onnx_path, package, target="llvm", weight_dtype=weight_dtype,
                      progress=lambda text: [progress(f"      {line}") for line in text.splitlines()])
    progress(f"built in {time.perf_counter() - start:.1f} s")
    return package


def run(package: str | Path | None = None, prompts: tuple[str, ...] = DEFAULT_PROMPTS, n: int = 4,
        max_tokens: int = 32, temperature: float = 0.8, seed: int = 0, progress=print) -> dict:
    """Generate `n` samples per prompt in one continuous batch; returns outputs, KV stats and speed."""
    package = Path(package) if package else default_package(progress=progress)
    llm = LLM(package)
    params = SamplingParams(n=n, temperature=temperature, top_p=0.95, max_tokens=max_tokens, seed=seed)
    start = time.perf_counter()
    outputs = llm.generate(list(prompts), params)
    seconds = time.perf_counter() - start
    stats, kv = llm.engine.stats, llm.manager.metrics()
    return {
        "package": str(package),
        "spec": llm.model.spec.uri,
        "outputs": [{"prompt": o.prompt, "completions": [(c.text, len(c.token_ids), c.finish_reason)
                                                         for c in o.outputs]} for o in outputs],
        "blocks": kv.num_blocks, "block_size": llm.manager.block_size,
        "peak_blocks_used": stats.peak_blocks_used, "peak_blocks_shared": stats.peak_blocks_shared,
        "peak_table_entries": stats.peak_table_entries, "slot_utilization": stats.mean_kv_utilization,
        "prefix_hits": kv.prefix_hits, "prefix_queries": kv.prefix_queries, "cow_copies": kv.cow_copies,
        "sequences": len(prompts) * n, "tokens": stats.tokens_generated, "steps": stats.steps,
        "seconds": seconds, "tokens_per_s": stats.tokens_generated / seconds,
    }


def report(r: dict) -> str:
    """`run`'s result as text."""
    lines = [f"model {Path(r['package']).name} (attention {r['spec']})", ""]
    for i, out in enumerate(r["outputs"]):
        lines.append(f"prompt {i}: {out['prompt']!r}")
        for j, (text, count, reason) in enumerate(out["completions"]):
            lines.append(f"  [{j}] {text[:60]!r} ({count} tokens, {reason})")
    saved = r["peak_table_entries"] - r["peak_blocks_used"]
    lines += [
        "",
        f"KV cache    {r['blocks']} blocks x {r['block_size']} tokens; peak {r['peak_blocks_used']} in use "
        f"({r['peak_blocks_used'] / r['blocks']:.1%} of the pool)",
        f"  sharing   peak {r['peak_blocks_shared']} blocks shared by parallel samples "
        f"({r['peak_table_entries']} block-table entries at that step; copy-on-write copies: {r['cow_copies']})"
        + (f", {saved} blocks saved" if saved > 0 else ""),
        f"  slots     {r['slot_utilization']:.1%} of allocated slots hold live tokens (mean over every 4th step)",
        f"  prefix    {r['prefix_hits']} of {r['prefix_queries']} full prompt blocks found in the prefix cache",
        f"throughput  {r['sequences']} sequences, {r['tokens']} tokens in {r['seconds']:.2f} s: "
        f"{r['tokens_per_s']:.0f} tokens/s ({r['steps']} steps)",
    ]
    return "\n".join(lines)
