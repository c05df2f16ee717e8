"""`verify`: a compiled model package against onnxruntime running the export it was compiled from.

onnxruntime runs each prompt alone with the export's own past/present KV (prefill, then greedy
decode steps); the paged model runs the same prompts as one ragged batch, the last prompt joining
at the second step so that a step mixes prefill and decode, fed the tokens onnxruntime chose.
Logits must agree within the dtype's tolerance; where they do not, the layers' K/V in the paged
pools are compared with onnxruntime's present outputs to name the first layer that diverges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, ModelImportError
from .reference import gather_kv
from .tensors import to_numpy

# Largest |Δlogit| accepted, relative to max(1, max |logit|) of onnxruntime's row.
TOLERANCE = {"float32": 2e-3, "float16": 3e-2, "bfloat16": 6e-2}
# A quantized KV cache against onnxruntime's float cache: the codes' own rounding (int8: half a
# step of amax / 127 per element; fp8 e4m3: 2^-4 relative) carried through every layer.
KV_TOLERANCE = {"int8": 3e-2, "fp8_e4m3": 1e-1}
# bf16 weights (`--weight-dtype bfloat16`) against the export's float32 ones: each matmul's
# weights and inputs rounded to 8 mantissa bits (2^-9 relative), carried through every layer.
# int8 weights and activations (`--weight-dtype int8`): each matmul's operands rounded to half a
# step of their row's / column's max / 127, carried through every layer.
WEIGHT_TOLERANCE = {"float32": 0.0, "bfloat16": 6e-2, "int8": 1e-1}
DECODE_STEPS = 4


@dataclass(frozen=True, slots=True)
class Reference:
    """onnxruntime's greedy run of one prompt: tokens, logits per step, present K/V per layer."""

    tokens: list[int]
    logits: list[np.ndarray]
    presents: list[np.ndarray]  # [2 * layers] of [Hkv, length, D]


def ort_generate(model_path: str | Path, prompt: list[int], max_tokens: int, eos_token_id: int | None = None,
                 session=None) -> Reference:
    """Greedy generation of one prompt with the export's own past/present KV.

    Raises:
        ConfigError: onnxruntime is not installed, or the export takes an input this cannot feed.
    """
    session = session or ort_session(model_path)
    inputs = {i.name: i for i in session.get_inputs()}
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    unknown = set(inputs) - {"input_ids", "attention_mask", "position_ids", *(p.name for p in past)}
    if unknown:
        raise ConfigError(f"verify: the export takes {sorted(unknown)}, which onnxruntime's reference run cannot "
                          "feed; compile with --no-verify")
    feed = {p.name: np.zeros((1, p.shape[1], 0, p.shape[3]), _np_dtype(p.type)) for p in past}
    ids, tokens, logits, new = list(prompt), [], [], list(prompt)
    out = []
    while len(tokens) < max_tokens:
        start = len(ids) - len(new)
        feed["input_ids"] = np.array([new], np.int64)
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones((1, len(ids)), np.int64)
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(start, len(ids), dtype=np.int64)[None]
        out = session.run(None, feed)
        row = out[0][0, -1].astype(np.float32)
        logits.append(row)
        token = int(np.argmax(row))
        tokens.append(token)
        feed.update({p.name: present for p, present in zip(past, out[1:])})
        if token == eos_token_id:
            break
        ids.append(token)
        new = [token]
    return Reference(tokens, logits, [p[0] for p in out[1:]])


def ort_session(model_path: str | Path):
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConfigError("verifying a compiled model needs onnxruntime: pip install onnxruntime, or compile "
                          "with --no-verify") from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def _np_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}.get(
        ort_type, np.float32)


def default_prompts(vocab_size: int, window: int | None, seed: int = 0) -> list[list[int]]:
    """Four prompts of different lengths (past one block, past a small window), ids past the specials."""
    rng = np.random.default_rng(seed)
    long = 2 * window + 3 if window is not None and window <= 64 else 37
    low = min(3, vocab_size - 1)
    return [[int(t) for t in rng.integers(low, vocab_size, n)] for n in (5, 18, long, 3)]


def verify(package: str | Path, model_path: str | Path, prompts: list[list[int]] | None = None,
           decode_steps: int = DECODE_STEPS, progress=print, device: str = "cpu") -> float:
    """Check `package` on `device` against onnxruntime (on the CPU) on `model_path`; returns the
    largest relative error.

    Raises:
        ModelImportError: logits differ beyond the dtype's tolerance; names the prompt, the step
            and the first layer whose K/V diverge.
    """
    from .model import PagedModel, StepInputs

    model = PagedModel(package, device)
    spec = model.spec
    prompts = prompts or default_prompts(model.vocab_size, spec.sliding_window)
    session = ort_session(model_path)
    refs = [ort_generate(model_path, p, decode_steps + 1, session=session) for p in prompts]
    bs = spec.block_size
    per_seq = -(-max(len(p) + decode_steps + 1 for p in prompts) // bs)
    tables = (1 + np.arange(len(prompts) * per_seq, dtype=np.int32)).reshape(len(prompts), per_seq)
    if tables.max() >= len(model.pools[0]):
        raise ConfigError(f"verify: {tables.max() + 1} blocks needed, the pool has {len(model.pools[0])}")
    weight_dtype = model.info.get("weight_dtype", "float32")
    tol = max(TOLERANCE[spec.dtype], KV_TOLERANCE.get(spec.kv_dtype, 0.0), WEIGHT_TOLERANCE[weight_dtype])
    worst = 0.0
    done = [0] * len(prompts)  # tokens of each prompt in the cache
    for step in range(decode_steps + 1):
        rows = [b for b in range(len(prompts)) if (b < len(prompts) - 1 or step > 0) and
                step - (b == len(prompts) - 1) < len(refs[b].logits)]
        new = {b: (prompts[b] if done[b] == 0 else [refs[b].tokens[_step_of(b, step, prompts) - 1]]) for b in rows}
        inputs = _step(tables, rows, new, done, bs, StepInputs)
        logits = model.forward(inputs)
        for i, b in enumerate(rows):
            k = _step_of(b, step, prompts)
            ref = refs[b].logits[k]
            err = float(np.max(np.abs(logits[i] - ref)) / max(1.0, float(np.max(np.abs(ref)))))
            worst = max(worst, err)
            if not err <= tol:
                where = _first_divergence(model, tables[b], refs[b], done[b] + len(new[b]), tol)
                raise ModelImportError(
                    f"the compiled model disagrees with onnxruntime: prompt {b} ({len(prompts[b])} tokens), "
                    f"{'prefill' if k == 0 else f'decode step {k}'}: max |logit difference| is {err:.3g} of the "
                    f"logits' scale (tolerance {tol:g} for {spec.dtype}, KV {spec.kv_dtype}, weights {weight_dtype}); {where}. The rewrite does not preserve "
                    "this export's attention: report it with the model, or compile with --no-verify")
        for b in rows:
            done[b] += len(new[b])
    progress(f"verified on {device} against onnxruntime: {len(prompts)} prompts, prefill + {decode_steps} decode steps "
             f"in mixed batches, largest logit error {worst:.2g} (tolerance {tol:g})")
    return worst


def _step_of(b: int, step: int, prompts) -> int:
    """Which of prompt b's reference steps the batch step runs (the last prompt starts one late)."""
    return step - (b == len(prompts) - 1)


def _step(tables, rows, new, done, bs, StepInputs):
    ids, positions, slots, indptr, lens = [], [], [], [0], []
    for b in rows:
        pos = np.arange(done[b], done[b] + len(new[b]))
        ids += new[b]
        positions.append(pos)
        slots.append(tables[b, pos // bs] * bs + pos % bs)
        indptr.append(indptr[-1] + len(new[b]))
        lens.append(done[b] + len(new[b]))
    return StepInputs(np.array(ids, np.int64), np.concatenate(positions).astype(np.int64),
                      np.ascontiguousarray(tables[rows]), np.concatenate(slots).astype(np.int32),
                      np.array(indptr, np.int32), np.array(lens, np.int32))


def _first_divergence(model, table: np.ndarray, ref: Reference, length: int, tol: float) -> str:
    """Which layer's cached K/V first differ from onnxruntime's presents for this sequence."""
    for layer, pool in enumerate(model.pools):
        paged = gather_kv(model.spec, to_numpy(pool), table, length)  # K, V [length, Hkv, D]
        for kv, name in ((0, "K"), (1, "V")):
            want = ref.presents[2 * layer + kv][:, :length].astype(np.float32)  # [Hkv, length, D]
            got = paged[kv].transpose(1, 0, 2).astype(np.float32)
            scale = max(1.0, float(np.max(np.abs(want))))
            bad = np.abs(got - want).max(axis=(0, 2)) / scale > tol
            if bad.any():
                where = f"layer {layer}'s cached {name} differs first at position {int(np.argmax(bad))}"
                return where + ("" if layer == 0 else f", so layer {layer - 1}'s attention output diverges")
    return "every layer's cached K/V agree, so the last layer's attention output or the LM head diverges"


def main(argv: list[str] | None = None) -> int:
    """`python -m pgen_runtime.verify PKG MODEL.onnx [--device cuda:0]`: verify a model package on
    this host's device (a CUDA package on its GPU host, where no TVM compiler is needed)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("package", help="NAME.pgenpkg written by pgen compile-model")
    parser.add_argument("model", help="the ONNX export it was compiled from")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--decode-steps", type=int, default=DECODE_STEPS)
    args = parser.parse_args(argv)
    verify(args.package, args.model, decode_steps=args.decode_steps, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
