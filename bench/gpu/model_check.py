"""The GPU check's model section: CUDA model packages against onnxruntime's tokens, timed against torch.

`prepare.py` writes .gpu/models/: the tiny model (`pgen.tiny`) compiled for cuda:sm_80,sm_90 with
float32 and float16 weights, `reference.json` (onnxruntime's greedy tokens and logits of a few
prompts, run on the build host: the device has no onnxruntime) and `weights.npz` with `config.json`
(the same weights, for the torch baseline); and real exports of transformers models, each package
with its own NAME.reference.json (checked, not timed).

On the device:
- correctness: each package generates greedily on cuda:0 for the reference prompts, alone and as
  one batch; float32 must give onnxruntime's tokens, float16 reports top-1 agreement and the
  largest logit difference (relative to the logits' scale) of the first step, where both see the
  same prompt; seeded parallel samples in a pool too small for them (copy-on-write, swap to host
  and back) must repeat the roomy pool's tokens;
- speed: tokens/s of `LLM.generate` at batch 1/8/32/128 (32 new tokens after an 8-token prompt)
  against a plain torch decoder of the same graph and weights (SDPA, a static KV cache, greedy,
  the same dtype), both on this GPU in one run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NEW_TOKENS = 32
PROMPT_TOKENS = 8
BATCHES = (1, 8, 32, 128)
# Largest |logit difference| / max(1, max |logit|) of the first step against onnxruntime's.
FIRST_STEP_TOLERANCE = {"float32": 2e-3, "float16": 3e-2}


class TorchTiny:
    """`pgen.tiny`'s decoder in torch: RMSNorm, RoPE, GQA through SDPA, SwiGLU, a static KV cache."""

    def __init__(self, weights: dict[str, np.ndarray], config: dict, device: str, dtype: torch.dtype):
        self.c = config
        self.dtype = dtype
        self.w = {k: torch.from_numpy(v).to(device=device, dtype=torch.float32 if k == "lm_bias" else dtype)
                  for k, v in weights.items()}
        d = config["head_dim"]
        inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.arange(config["max_positions"], dtype=torch.float64)[:, None] * inv[None]
        angles = torch.cat([angles, angles], -1)
        self.cos, self.sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
        self.device = device

    def _norm(self, x, w):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(self.dtype) * w

    def _rope(self, x, pos):  # x [B, H, S, D]
        cos, sin = self.cos[pos], self.sin[pos]  # [S, D], broadcast over batch and heads
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def generate(self, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy tokens [B, new_tokens] after prompts [B, S] (all of one length)."""
        c, w = self.c, self.w
        batch, length = prompts.shape
        total = length + new_tokens
        hq, hkv, d = c["q_heads"], c["kv_heads"], c["head_dim"]
        cache = [torch.zeros(2, batch, hkv, total, d, device=self.device, dtype=self.dtype) for _ in range(c["layers"])]
        ids, start, out = prompts, 0, []
        for _ in range(new_tokens):
            s = ids.shape[1]
            pos = torch.arange(start, start + s, device=self.device)
            x = w["embed"][ids]
            for i in range(c["layers"]):
                h = self._norm(x, w[f"l{i}.norm1"])
                q = self._rope((h @ w[f"l{i}.q"]).view(batch, s, hq, d).transpose(1, 2), pos)
                k = self._rope((h @ w[f"l{i}.k"]).view(batch, s, hkv, d).transpose(1, 2), pos)
                v = (h @ w[f"l{i}.v"]).view(batch, s, hkv, d).transpose(1, 2)
                cache[i][0, :, :, start:start + s] = k
                cache[i][1, :, :, start:start + s] = v
                keys, values = cache[i][0, :, :, :start + s], cache[i][1, :, :, :start + s]
                attn = F.scaled_dot_product_attention(q, keys, values, is_causal=s > 1, enable_gqa=True)
                x = x + attn.transpose(1, 2).reshape(batch, s, hq * d) @ w[f"l{i}.o"]
                h = self._norm(x, w[f"l{i}.norm2"])
                x = x + (F.silu(h @ w[f"l{i}.gate"]) * (h @ w[f"l{i}.up"])) @ w[f"l{i}.down"]
            logits = (self._norm(x[:, -1], w["norm"]) @ w["lm_head"]).float() + w["lm_bias"]
            ids = logits.argmax(-1, keepdim=True)
            out.append(ids)
            start += s
        return torch.cat(out, 1)


def check_models(root: Path, device: str) -> dict:
    """Correctness and tokens/s of every CUDA model package in `root` (prepare.py's models/)."""
    from pgen_runtime import LLM, SamplingParams

    config = json.loads((root / "config.json").read_text())
    weights = dict(np.load(root / "weights.npz"))
    report = {"checks": [], "timings": []}
    for pkg in sorted(root.glob("*.pgenpkg")):
        # A real export's package has its own reference (NAME.reference.json) and is not timed.
        own = root / (pkg.name.removesuffix(".pgenpkg") + ".reference.json")
        timed = not own.is_file()
        reference = json.loads((own if own.is_file() else root / "reference.json").read_text())
        weight_dtype = json.loads((pkg / "manifest.json").read_text())["model"]["weight_dtype"]
        print(f"\n== model {pkg.name} (weights {weight_dtype}) on {device}", flush=True)
        llm = LLM(pkg, device=device)
        prompts = [r["prompt"] for r in reference["prompts"]]
        greedy = SamplingParams(max_tokens=len(reference["prompts"][0]["tokens"]), ignore_eos=True)
        for mode, outs in (("alone", [llm.generate([p], greedy)[0] for p in prompts]),
                           ("batch", llm.generate(prompts, greedy))):
            same = sum(o.outputs[0].token_ids == r["tokens"] for o, r in zip(outs, reference["prompts"]))
            agree = [np.mean([a == b for a, b in zip(o.outputs[0].token_ids, r["tokens"])])
                     for o, r in zip(outs, reference["prompts"])]
            ok = same == len(prompts) if weight_dtype == "float32" else min(agree) >= 0.5
            row = {"package": pkg.name, "mode": mode, "sequences_equal": int(same), "of": len(prompts),
                   "top1_agreement": float(np.mean(agree)), "ok": bool(ok)}
            report["checks"].append(row)
            print(f"  {mode:<6} {'ok  ' if ok else 'FAIL'} {same}/{len(prompts)} sequences equal onnxruntime's, "
                  f"top-1 agreement {row['top1_agreement']:.3f}", flush=True)
        report["checks"].append(_preemption_check(pkg, device, llm, prompts))
        first = _first_step_error(pkg, device, reference)
        report["checks"].append({"package": pkg.name, "mode": "first-step logits", "max_rel_err": first,
                                 "ok": bool(first <= FIRST_STEP_TOLERANCE[weight_dtype])})
        print(f"  first-step logits: max |diff| / scale = {first:.2e}", flush=True)
        if not timed:
            continue
        dtype = torch.float32 if weight_dtype == "float32" else torch.float16
        baseline = TorchTiny(weights, config, device, dtype)
        for batch in BATCHES:
            rng = np.random.default_rng(batch)
            ids = rng.integers(3, config["vocab"], (batch, PROMPT_TOKENS))
            params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
            pgen_s = _best(lambda: llm.generate([list(map(int, r)) for r in ids], params))
            prompts_t = torch.from_numpy(ids).to(device)
            torch_s = _best(lambda: (baseline.generate(prompts_t, NEW_TOKENS), _sync(device)))
            row = {"package": pkg.name, "batch": batch, "pgen_tok_s": batch * NEW_TOKENS / pgen_s,
                   "torch_tok_s": batch * NEW_TOKENS / torch_s}
            row["speedup"] = row["pgen_tok_s"] / row["torch_tok_s"]
            report["timings"].append(row)
            print(f"  batch {batch:>3}: pgen {row['pgen_tok_s']:>9.0f} tok/s   torch (SDPA loop, {dtype}) "
                  f"{row['torch_tok_s']:>9.0f} tok/s   {row['speedup']:.2f}x", flush=True)
    return report


def _preemption_check(pkg: Path, device: str, llm, prompts) -> dict:
    """Seeded parallel samples (copy-on-write of the shared prompt blocks) in a pool too small for
    the batch (swap to host memory and back) give the same tokens as in a roomy pool."""
    from pgen_runtime import LLM, SamplingParams

    params = SamplingParams(n=3, temperature=0.9, top_k=40, seed=7, max_tokens=20, ignore_eos=True)
    roomy = llm.generate(prompts, params)
    small = LLM(pkg, device=device, num_blocks=10, preemption_mode="swap", max_num_batched_tokens=32)
    crowded = small.generate(prompts, params)
    metrics = small.manager.metrics()
    same = all([c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs] for a, b in zip(roomy, crowded))
    ok = same and metrics.swaps_out > 0
    print(f"  swap   {'ok  ' if ok else 'FAIL'} {metrics.swaps_out} swaps out, n=3 samples "
          f"{'equal' if same else 'DIFFER'} with and without preemption", flush=True)
    return {"package": pkg.name, "mode": "swap + copy-on-write", "swaps_out": int(metrics.swaps_out), "ok": bool(ok)}


def _first_step_error(pkg: Path, device: str, reference) -> float:
    """Largest |logit - onnxruntime's| / max(1, max |logit|) over the prompts' first step, where
    both models see only the prompt (a model of its own: the engine's pools stay untouched)."""
    from pgen_runtime.model import PagedModel, StepInputs

    model = PagedModel(pkg, device)
    worst = 0.0
    for r in reference["prompts"]:
        prompt = np.array(r["prompt"], np.int64)
        bs = model.spec.block_size
        blocks = -(-len(prompt) // bs)
        table = np.arange(1, blocks + 1, dtype=np.int32)[None]
        pos = np.arange(len(prompt))
        step = StepInputs(prompt, pos.astype(np.int64), table, (table[0, pos // bs] * bs + pos % bs).astype(np.int32),
                          np.array([0, len(prompt)], np.int32), np.array([len(prompt)], np.int32))
        got = model.forward(step)[0]
        want = np.array(r["logits"][0], np.float32)
        worst = max(worst, float(np.abs(got - want).max() / max(1.0, np.abs(want).max())))
    return worst


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best(fn, repeats: int = 3) -> float:
    fn()  # warm: loads, allocations, first launches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
