"""Real transformers models (tiny, random weights, built from configs: no hub) exported the two ways
users export them: optimum (`text-generation-with-past`, the TorchScript exporter, opset 18) and
`torch.onnx.export(..., dynamo=True)` with the past KV as a DynamicCache, at opset 18 or 23 (where
rotary models emit ONNX's `RotaryEmbedding`).

`export(family, exporter, attn, root)` writes `root/<family>-<attn>-<exporter>/model.onnx` once
and returns its path (`-opset23` appended to the folder for `opset=23`); `FAMILIES` lists the
model families, with the features that matter for the rewrite (GQA, fused QKV, sliding windows,
soft-capping, partial rotary, learned positions).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import torch

EXPORTERS = ("optimum", "dynamo")
OPSETS = (18, 23)  # the dynamo export's; optimum's TorchScript exporter writes opset 18
ATTENTIONS = ("sdpa", "eager")
WINDOW = 16  # Mistral's and Gemma-2's sliding window: shorter than the test prompts
EOS_TOKEN_ID = 2


def _common():
    return dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=EOS_TOKEN_ID, pad_token_id=0)


def _configs():
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**_common(), num_key_value_heads=2),
        "qwen2": lambda: tf.Qwen2Config(**_common(), num_key_value_heads=2),
        "mistral": lambda: tf.MistralConfig(**_common(), num_key_value_heads=2, sliding_window=WINDOW),
        "phi3": lambda: tf.Phi3Config(**_common(), num_key_value_heads=2),
        "gemma2": lambda: tf.Gemma2Config(**_common(), num_key_value_heads=2, head_dim=32, sliding_window=WINDOW,
                                          query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                                          final_logit_softcapping=30.0),
        "gpt2": lambda: tf.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=512,
                                      bos_token_id=1, eos_token_id=EOS_TOKEN_ID),
        # Rotary through repeat_interleave: tiles and expands by shapes computed from the batch.
        "gptj": lambda: tf.GPTJConfig(vocab_size=256, n_embd=128, n_layer=2, n_head=4, rotary_dim=16,
                                      n_positions=512, bos_token_id=1, eos_token_id=EOS_TOKEN_ID),
        "cohere": lambda: tf.CohereConfig(**_common(), num_key_value_heads=2),
    }


FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma2", "gpt2", "gptj", "cohere")
# transformers 4.57 has no SDPA attention for GPT-J.
_ATTENTIONS = {"gptj": ("eager",)}
# Exports pgen refuses with ModelImportError, and what the message says: Cohere's TorchScript
# repeat_interleave tiles its rotary table by a run-time shape, which TVM's frontend cannot type.
REFUSED = {("cohere", "optimum"): "lost the shape of the attention's q"}


def attentions(family: str) -> tuple[str, ...]:
    """The attention implementations transformers offers for `family`."""
    return _ATTENTIONS.get(family, ATTENTIONS)


def build(family: str, attn: str, seed: int = 0):
    """The model of `family` with transformers' attention implementation `attn`, random weights."""
    import transformers as tf

    torch.manual_seed(seed)
    config = _configs()[family]()
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    with torch.no_grad():  # spread the logits: random init is too flat for greedy tokens to be stable
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5 * (2.0 if "embed" in name or "wte" in name else 1.0))
    return model.eval()


@functools.cache
def export(family: str, exporter: str, attn: str, root: str, opset: int = 18) -> Path:
    """`root/<family>-<attn>-<exporter>/model.onnx`, exported once; optimum's config.json and
    generation_config.json lie beside it, as optimum-cli writes them. `opset` is the dynamo
    export's (18 or 23)."""
    if opset not in OPSETS or (exporter == "optimum" and opset != 18):
        raise ValueError(f"opset {opset} for the {exporter} export: optimum exports at 18, dynamo at {OPSETS}")
    folder = Path(root) / (f"{family}-{attn}-{exporter}" + ("" if opset == 18 else f"-opset{opset}"))
    path = folder / "model.onnx"
    if path.is_file():
        return path
    model = build(family, attn)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if exporter == "optimum":
        _optimum(model, partial)
    else:
        _dynamo(model, partial, opset)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # whole or not at all: an interrupted export is redone
    return path


def _optimum(model, folder: Path) -> None:
    """What `optimum-cli export onnx --task text-generation-with-past` writes, from the model object
    (main_export reloads the model and picks its own attention implementation)."""
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_export_from_model(model, str(folder), task="text-generation-with-past", do_validation=False,
                           no_post_process=True)


class _WithCache(torch.nn.Module):
    """The model with flat past/present tensors (what an ONNX graph can take) instead of a Cache."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        import transformers as tf

        cache = tf.DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _dynamo(model, folder: Path, opset: int) -> None:
    c = model.config
    layers = c.num_hidden_layers
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    batch, seq, past = 2, 5, 3
    args = (torch.randint(3, c.vocab_size, (batch, seq)), torch.ones(batch, past + seq, dtype=torch.int64),
            torch.arange(past, past + seq)[None].expand(batch, seq).contiguous(),
            *[torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * layers)])
    names = [f".{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values{n}" for n in names)]
    outputs = ["logits", *(f"present{n}" for n in names)]
    # GPT-2's eager attention slices a causal-bias buffer of max_position_embeddings rows: bound the dims.
    limit = c.max_position_embeddings // 2
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq", max=limit), torch.export.Dim("past", max=limit)
    shapes = ({0: b, 1: s}, {0: b, 1: torch.export.Dim.AUTO}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in names))
    program = torch.onnx.export(_WithCache(model), args, input_names=inputs, output_names=outputs,
                                dynamic_shapes=shapes, opset_version=opset, dynamo=True)
    folder.mkdir(parents=True)
    program.save(str(folder / "model.onnx"))
