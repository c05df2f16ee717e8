"""References for the engine, all on onnxruntime running the original export without a cache."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort


def _session(onnx_path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def log_probs(onnx_path, sequences: list[list[int]]) -> np.ndarray:
    """float64 log-softmax of the logits at every position of equal-length sequences: [N, L, V]."""
    session = _session(onnx_path)
    ids = np.array(sequences, np.int64)
    n, length = ids.shape
    feed = {"input_ids": ids, "attention_mask": np.ones((n, length), np.int64),
            "position_ids": np.broadcast_to(np.arange(length), (n, length)).copy()}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((n, i.shape[1], 0, i.shape[3]), np.float32)
    z = session.run(["logits"], feed)[0].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def brute_force_best(onnx_path, prompt: list[int], length: int, vocab: int, n: int) -> list[tuple[float, list[int]]]:
    """The n most likely continuations of exactly `length` tokens, by scoring all vocab**length."""
    conts = [list(c) for c in itertools.product(range(vocab), repeat=length)]
    lp = log_probs(onnx_path, [prompt + c for c in conts])
    p = len(prompt)
    scores = [sum(lp[i, p - 1 + j, t] for j, t in enumerate(c)) for i, c in enumerate(conts)]
    order = sorted(range(len(conts)), key=lambda i: -scores[i])
    return [(scores[i], conts[i]) for i in order[:n]]


def beam_search(onnx_path, prompt: list[int], width: int, max_tokens: int, n: int, eos: int):
    """Beam search scoring every beam by a full forward pass: [(score, tokens, reason)] best first.

    A hypothesis ending in EOS (or at max_tokens) counts only among the `width` best candidates;
    the search stops when no live beam can beat the `width`-th finished hypothesis.
    """
    beams, hyps = [(0.0, [])], []
    while True:
        candidates = []
        for score, gen in beams:
            lp = log_probs(onnx_path, [prompt + gen])[0, -1]
            candidates += [(score + lp[t], gen, int(t)) for t in np.argsort(-lp, kind="stable")[:2 * width]]
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for rank, (score, gen, t) in enumerate(candidates):
            ended = len(gen) + 1 >= max_tokens
            if ended or t == eos:
                if rank < width:
                    hyps.append((score, gen + [t], "length" if ended else "stop"))
                continue
            beams.append((score, gen + [t]))
            if len(beams) == width:
                break
        hyps.sort(key=lambda h: -h[0])
        if not beams or (len(hyps) >= width and beams[0][0] <= hyps[width - 1][0]):
            return hyps[:n]
