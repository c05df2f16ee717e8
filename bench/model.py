"""Model benchmark: a compiled pgen package against onnxruntime running the same ONNX file.

Per model: the ONNX decoder (`pgen.tiny`'s LLaMA-style graph, deterministic random weights) is
compiled by `compile_model`; onnxruntime runs the original file with its own past/present KV loop.
Both generate `--tokens` greedy tokens after a `--prompt`-token prompt, for batches of B equal-length
prompts (onnxruntime's best case: one padded batch with no padding). Rounds interleave the two
systems; the table reports medians.

- decode ms/token: (time of prompt + N tokens - time of prompt + 1 token) / (N - 1), batch 1;
- tokens/s at batch B: B * N / time of prompt + N tokens.

Models: `tiny` (pgen run's default, 0.3M parameters) and `qwen0.5b` (Qwen2.5-0.5B's shape: hidden
896, 24 layers, 14 query / 2 KV heads of 64, FFN 4864; vocabulary cut to `--qwen-vocab`, default
32768, since fp32 weights are embedded in model.so).

- `--weight-dtypes float32,bfloat16,int8` adds pgen packages of the same file compiled with
  `--weight-dtype bfloat16` / `int8` (interleaved with the others), and the share of their greedy tokens equal
  to the float32 package's. With int8, onnxruntime also runs its own int8 version of the file
  (`quantize_dynamic`, per-channel int8 weights), so int8 is compared with int8 too.

    python bench/model.py [--models tiny,qwen0.5b] [--batches 1,8,32] [--prompt 32] [--tokens 32]
                          [--repeats 3] [--weight-dtypes float32[,bfloat16][,int8]]

Prints a table and writes bench/results/model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from pgen.run import default_package, models_root
from pgen.tiny import TinyConfig, export
from pgen_runtime import LLM, SamplingParams

RESULTS = Path(__file__).parent / "results" / "model.json"


def configs(qwen_vocab: int) -> dict[str, TinyConfig]:
    return {"tiny": TinyConfig(),
            "qwen0.5b": TinyConfig(vocab=qwen_vocab, hidden=896, layers=24, q_heads=14, kv_heads=2, head_dim=64,
                                   ffn=4864)}


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Spinning intra-op threads would keep the cores busy after each run and slow the interleaved pgen runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_generate(session, prompts: np.ndarray, tokens: int) -> float:
    """Seconds for onnxruntime to prefill `prompts` [B, P] and decode greedily to `tokens` tokens."""
    names = {i.name for i in session.get_inputs()}
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    batch, length = prompts.shape
    feed = {p.name: np.zeros((batch, p.shape[1], 0, p.shape[3]), np.float32) for p in past}
    ids = prompts
    start = time.perf_counter()
    for step in range(tokens):
        total = length + step
        feed["input_ids"] = ids
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones((batch, total), np.int64)
        if "position_ids" in names:
            feed["position_ids"] = np.broadcast_to(np.arange(total - ids.shape[1], total), ids.shape).copy()
        out = session.run(None, feed)
        feed.update({p.name: present for p, present in zip(past, out[1:])})
        ids = out[0][:, -1].argmax(-1)[:, None].astype(np.int64)
    return time.perf_counter() - start


def pgen_generate(llm: LLM, prompts: np.ndarray, tokens: int, out: list | None = None) -> float:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([[int(t) for t in row] for row in prompts], params)
    seconds = time.perf_counter() - start
    assert all(len(o.token_ids) == tokens for o in outputs)
    if out is not None:
        out[:] = [list(o.token_ids) for o in outputs]
    return seconds


SYSTEM = {"float32": "pgen", "bfloat16": "pgen_bf16", "int8": "pgen_int8"}


def bench(name: str, config: TinyConfig, batches: list[int], prompt: int, tokens: int, repeats: int,
          weight_dtypes: tuple[str, ...] = ("float32",)) -> list[dict]:
    llms = {}
    for dtype in weight_dtypes:
        package = default_package(config, progress=lambda line: print(f"  {line}"), weight_dtype=dtype)
        llms[SYSTEM[dtype]] = LLM(package, max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * prompt)
    onnx_path = models_root() / f"{config.name}.onnx"
    if not onnx_path.is_file():
        export(onnx_path, config)
    sessions = {"ort": ort_session(onnx_path)}
    if "int8" in weight_dtypes:  # int8 against int8: onnxruntime's own dynamic quantization of the file
        sessions["ort_int8"] = ort_session(ort_int8_model(onnx_path))
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        prompts = rng.integers(3, config.vocab, (batch, prompt)).astype(np.int64)
        lengths = [tokens, 1] if batch == 1 else [tokens]
        systems = (*sessions, *llms)
        times = {(system, n): [] for system in systems for n in lengths}
        # Untimed warm-up: the first run pays for page-faulting the weights in (model.so maps
        # them from disk) and for growing each system's memory pools to this batch.
        for session in sessions.values():
            ort_generate(session, prompts, 2)
        generated = {system: [] for system in llms}
        for system, llm in llms.items():
            pgen_generate(llm, prompts, tokens, generated[system])
        for _ in range(repeats):  # interleaved: the host's memory bandwidth drifts
            for n in lengths:
                for system, session in sessions.items():
                    times[system, n].append(ort_generate(session, prompts, n))
                for system, llm in llms.items():
                    times[system, n].append(pgen_generate(llm, prompts, n))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "batch": batch, "prompt": prompt, "tokens": tokens}
        for system in systems:
            row[f"{system}_tok_s"] = batch * tokens / med[system, tokens]
            if batch == 1:
                row[f"{system}_ms_per_token"] = 1e3 * (med[system, tokens] - med[system, 1]) / (tokens - 1)
        for system in (*llms, *(s for s in sessions if s != "ort")):
            row[f"{system}_speedup"] = row[f"{system}_tok_s"] / row["ort_tok_s"]
        if "ort_int8" in sessions and "pgen_int8" in llms:
            row["pgen_int8_vs_ort_int8"] = row["pgen_int8_tok_s"] / row["ort_int8_tok_s"]
        for dtype in ("bfloat16", "int8"):
            if "pgen" in llms and SYSTEM[dtype] in llms:
                pairs = [(a, b) for ra, rb in zip(generated["pgen"], generated[SYSTEM[dtype]]) for a, b in zip(ra, rb)]
                row[f"{SYSTEM[dtype]}_token_agreement"] = sum(a == b for a, b in pairs) / len(pairs)
        rows.append(row)
        print(f"  batch {batch}: {row}")
    return rows


def ort_int8_model(path: Path) -> Path:
    """`path` quantized by onnxruntime's `quantize_dynamic` (int8 weights per column, activations
    quantized per step: ORT's MatMulInteger / DynamicQuantizeLinear), cached beside it."""
    out = path.with_name(path.stem + "-ort-int8.onnx")
    if not out.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def table(rows: list[dict]) -> str:
    systems = [s for s in ("ort_int8", *SYSTEM.values()) if any(f"{s}_tok_s" in r for r in rows)]
    head = ["model", "batch", "ORT ms/token", *(f"{s} ms/token" for s in systems), "ORT tok/s",
            *(f"{s} tok/s" for s in systems), *(f"{s} / ORT" for s in systems)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["model"], str(r["batch"])]
        cells += [f"{r[f'{s}_ms_per_token']:.2f}" if f"{s}_ms_per_token" in r else "" for s in ("ort", *systems)]
        cells += [f"{r[f'{s}_tok_s']:.0f}" for s in ("ort", *systems)]
        cells += [f"{r[f'{s}_speedup']:.2f}x" for s in systems]
        lines.append("| " + " | ".join(cells) + " |")
    if any("pgen_int8_vs_ort_int8" in r for r in rows):
        lines.append("")
        lines.append("pgen int8 / onnxruntime int8 (quantize_dynamic): " + ", ".join(
            f"{r['model']} batch {r['batch']} {r['pgen_int8_vs_ort_int8']:.2f}x" for r in rows
            if "pgen_int8_vs_ort_int8" in r))
    for system in ("pgen_bf16", "pgen_int8"):
        key = f"{system}_token_agreement"
        if any(key in r for r in rows):
            lines.append("")
            lines.append(f"greedy tokens of {system} equal to the float32 package's: " + ", ".join(
                f"{r['model']} batch {r['batch']} {100 * r[key]:.0f}%" for r in rows if key in r))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,qwen0.5b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qwen-vocab", type=int, default=32768)
    ap.add_argument("--weight-dtypes", default="float32", help="comma list of float32, bfloat16, int8: one pgen package each")
    args = ap.parse_args()
    weight_dtypes = tuple(args.weight_dtypes.split(","))
    if not set(weight_dtypes) <= set(SYSTEM):
        ap.error(f"--weight-dtypes: each of {weight_dtypes} must be one of {', '.join(SYSTEM)}")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.models.split(","):
        print(f"{name}:")
        rows += bench(name, configs(args.qwen_vocab)[name], batches, args.prompt, args.tokens, args.repeats,
                      weight_dtypes)
    print(table(rows))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                   "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
