"""What the engine hands out: per-request outputs, and the running statistics servers report."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

THROUGHPUT_WINDOW_S = 10.0
UTILIZATION_EVERY = 4  # steps between samples of the mean KV slot utilization


@dataclass(slots=True)
class CompletionOutput:
    """One completion: generated ids (a stop token included), its text, and why it ended.

    `text` grows as tokens come; while unfinished it holds back what could still become a stop
    string or an incomplete character, so a stream may send `text[already_sent:]` each time.
    """

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS, stop id or string), "length", "abort" or "error"
    cumulative_logprob: float | None = None  # beam search
    logits: list[np.ndarray] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """A request's completions; `token_ids`, `text`, `finish_reason`, `logits` are completion 0's."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None  # why the request failed (finish_reason "error"): a model step raised

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logits(self) -> list[np.ndarray]:
        return self.outputs[0].logits

    def snapshot(self) -> RequestOutput:
        """A copy another thread may read while the engine goes on."""
        outs = [dataclasses.replace(o, token_ids=list(o.token_ids), logits=[]) for o in self.outputs]
        return dataclasses.replace(self, outputs=outs, prompt_token_ids=self.prompt_token_ids)


@dataclass(slots=True)
class EngineStats:
    """Counters since start, peaks of KV sharing, and a sliding window of generated tokens."""

    steps: int = 0
    step_time_s: float = 0.0
    tokens_computed: int = 0  # prompt, re-prefill and decode tokens run through the model
    tokens_generated: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    requests_failed: int = 0  # a model step they were in raised
    peak_blocks_used: int = 0
    peak_blocks_shared: int = 0  # blocks in more than one block table at once
    peak_table_entries: int = 0  # block-table entries at that moment (blocks without sharing)
    kv_utilization_sum: float = 0.0  # live / allocated slots, summed over the sampled steps
    kv_utilization_samples: int = 0
    _window: deque = field(default_factory=deque)

    def record_step(self, seconds: float, manager: Any) -> None:
        self.steps += 1
        self.step_time_s += seconds
        now = time.monotonic()
        self._window.append((now, self.tokens_generated))
        while self._window and now - self._window[0][0] > THROUGHPUT_WINDOW_S:
            self._window.popleft()
        self.peak_blocks_used = max(self.peak_blocks_used, manager.block_pool.num_used)
        # NOTE: slot utilization walks every sequence: sampled every UTILIZATION_EVERY steps.
        if (self.steps - 1) % UTILIZATION_EVERY == 0:
            self.kv_utilization_sum += manager.metrics().utilization
            self.kv_utilization_samples += 1
        pool = manager.block_pool
        if pool.num_shared > self.peak_blocks_shared:
            self.peak_blocks_shared, self.peak_table_entries = pool.num_shared, pool.num_refs

    @property
    def mean_kv_utilization(self) -> float:
        return self.kv_utilization_sum / self.kv_utilization_samples if self.kv_utilization_samples else 1.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last THROUGHPUT_WINDOW_S seconds."""
        if len(self._window) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._window[0], self._window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
