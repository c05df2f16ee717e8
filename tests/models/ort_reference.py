"""The reference the paged model is checked against: onnxruntime running the original export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def ort_generate(model_path, prompt: list[int], max_tokens: int, eos_token_id: int | None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy generation of one prompt with the export's own past/present KV; (tokens, logits per token)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    inputs = [i for i in session.get_inputs()]
    past = [i for i in inputs if i.name.startswith("past_key_values")]
    feed = {p.name: np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32) for p in past}
    ids, tokens, logits = list(prompt), [], []
    new = list(prompt)
    while len(tokens) < max_tokens:
        start = len(ids) - len(new)
        feed.update(input_ids=np.array([new], np.int64),
                    attention_mask=np.ones((1, len(ids)), np.int64),
                    position_ids=np.arange(start, len(ids), dtype=np.int64)[None])
        out = session.run(None, feed)
        row = out[0][0, -1]
        logits.append(row)
        token = int(np.argmax(row))
        tokens.append(token)
        if token == eos_token_id:
            break
        feed.update({p.name: present for p, present in zip(past, out[1:])})
        ids.append(token)
        new = [token]
    return tokens, logits
