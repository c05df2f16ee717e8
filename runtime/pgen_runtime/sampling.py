"""`SamplingParams` and the token samplers: greedy, temperature with top-k / top-p, beam log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    Args:
        n: completions per prompt; they share the prompt's KV blocks (copy-on-write).
        temperature: 0 is greedy; otherwise sample from softmax(logits / temperature).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: all).
        top_k: keep the k most likely tokens (0: all).
        max_tokens: generated tokens per completion at most.
        stop: strings that end a completion (not included in its text); needs a tokenizer.
        stop_token_ids: token ids that end a completion (included in its ids, like EOS).
        seed: makes sampling reproducible; completion i draws from its own stream (seed, i).
        beam_width: > 1 runs beam search with this many beams and returns the `n` best.
        ignore_eos: keep generating after the model's EOS token.
        return_logits: keep each step's logits in the output (for tests and debugging).
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    beam_width: int = 1
    ignore_eos: bool = False
    return_logits: bool = False

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check_int("n", self.n, 1)
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("top_k", self.top_k, 0)
        _check_int("beam_width", self.beam_width, 1)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature={self.temperature!r} must be in [0, 100] (0 is greedy)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1] (1 keeps every token)")
        if not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"stop={self.stop!r} must be non-empty strings")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids[i]", t, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if self.use_beam_search and self.n > self.beam_width:
            raise ConfigError(f"n={self.n} > beam_width={self.beam_width}; beam search returns at most "
                              "beam_width completions")

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, argmax: int | None = None) -> int:
    """One token from a row of logits: argmax at temperature 0 (`argmax` when the caller computed it
    for a whole batch at once), else top-k / top-p sampling."""
    if params.temperature == 0.0:
        return int(np.argmax(logits)) if argmax is None else argmax
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    prob = np.exp(z[order] - z[order[0]])
    prob /= prob.sum()
    if params.top_p < 1.0:
        # Keep the tokens before the cumulative probability reaches top_p, and the one that reaches it.
        keep = int(np.searchsorted(np.cumsum(prob), params.top_p)) + 1
        order, prob = order[:keep], prob[:keep] / prob[:keep].sum()
    return int(order[rng.choice(len(order), p=prob)])
