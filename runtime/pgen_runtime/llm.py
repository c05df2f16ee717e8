"""`LLM`: offline generation from a model package, with chunked prefill, decode and preemption.

One step schedules running sequences first (a decode token or the next prefill chunk each), then
admits waiting ones (new, swapped out, or preempted by recompute) while the token budget and the
KV pool allow. When a running sequence cannot grow, the newest running sequence is preempted
(nano-vllm's policy), by swap or recompute. KV memory goes through `KVCacheManager`, so prefix-cache
hits skip the cached part of a prompt and shared blocks are copied before they are written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, ShapeError
from .kv_cache_manager import KVCacheManager
from .model import PagedModel, StepInputs
from .preemption import PreemptionPolicy


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens: greedy at temperature 0, else sampling from softmax(logits / temperature)."""

    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    return_logits: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature={self.temperature!r} must be >= 0 (0 is greedy)")


@dataclass(slots=True)
class RequestOutput:
    """One prompt's result: generated ids (EOS included), why it stopped, and logits on request."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    logits: list[np.ndarray] = field(default_factory=list)


@dataclass(slots=True)
class _Request:
    seq_id: int
    tokens: list[int]
    params: SamplingParams
    output: RequestOutput
    rng: np.random.Generator
    num_computed: int = 0  # leading tokens whose KV is in the cache
    swapped: bool = False

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed


class LLM:
    """Generate from a package written by `pgen compile-model`.

    Args:
        package_path: the model package.
        device: "cpu".
        num_blocks: KV blocks per layer (null block included); default: room for 4096 tokens.
        num_host_blocks: host blocks for swapped-out sequences; default: as many as num_blocks.
        max_num_batched_tokens: tokens per step (decode tokens plus prefill chunks).
        preemption_mode: "swap" or "recompute" to force one; None lets the policy choose.
        enable_prefix_caching: reuse the KV of equal prompt prefixes across sequences.
    """

    def __init__(self, package_path: str | Path, device: str = "cpu", num_blocks: int | None = None,
                 num_host_blocks: int | None = None, max_num_batched_tokens: int = 256,
                 preemption_mode: str | None = None, enable_prefix_caching: bool = True) -> None:
        if max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= 1")
        if preemption_mode not in (None, "swap", "recompute"):
            raise ConfigError(f"preemption_mode={preemption_mode!r}; use 'swap', 'recompute' or None")
        self.model = PagedModel(package_path, device, num_blocks)
        blocks = len(self.model.pools[0])
        self.manager = KVCacheManager(blocks, self.model.spec.block_size,
                                      num_host_blocks=blocks if num_host_blocks is None else num_host_blocks,
                                      enable_prefix_caching=enable_prefix_caching, kv=self.model,
                                      policy=PreemptionPolicy())
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self._next_id = 0

    @property
    def pools(self) -> list[np.ndarray]:
        return self.model.pools

    @property
    def kernels(self):
        return self.model.kernels

    def generate(self, prompts: list[list[int]], sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate for every prompt (token-id lists) in one continuous batch; one output per prompt.

        Raises:
            ShapeError: an empty prompt or a token id outside the vocabulary.
            OutOfBlocksError: a sequence cannot fit in the whole pool.
        """
        params = sampling_params or SamplingParams()
        requests = [self._request(p, params) for p in prompts]
        waiting, running = deque(requests), []
        while waiting or running:
            batch = self._schedule(waiting, running)
            if not batch:
                raise ConfigError("no sequence could be scheduled; raise num_blocks")
            logits = self.model.forward(self._inputs(batch))
            for (req, start, count), row in zip(batch, logits):
                req.num_computed = start + count
                if req.num_pending == 0:
                    self._append(req, row, running)
        return [r.output for r in requests]

    # ---- scheduling ----------------------------------------------------------------------

    def _schedule(self, waiting: deque, running: list) -> list[tuple[_Request, int, int]]:
        budget, batch, queued = self.max_num_batched_tokens, [], len(waiting)
        for req in list(running):
            if budget == 0 or req not in running:  # victims are the newest, so the rest are gone too
                break
            entry = self._allocate(req, budget, running, waiting)
            if entry is not None:
                batch.append(entry)
                budget -= entry[2]
        # Admit only when nothing was preempted: a preempted sequence must not bounce straight back.
        while waiting and budget > 0 and len(waiting) == queued:
            req = waiting[0]
            if req.swapped:
                if not self.manager.can_swap_in(req.seq_id):
                    break
                self.manager.swap_in(req.seq_id)
                req.swapped = False
                running.append(waiting.popleft())
                queued -= 1
                entry = self._allocate(req, budget, None, None)
            else:
                entry = self._allocate(req, budget, None, None)
                if entry is not None:
                    running.append(waiting.popleft())
                    queued -= 1
            if entry is None:
                break
            batch.append(entry)
            budget -= entry[2]
        return batch

    def _allocate(self, req: _Request, budget: int, running: list | None, waiting: deque | None):
        """Reserve slots for the next chunk of `req`, preempting the newest running ones if needed."""
        fresh = req.num_computed == 0
        count = min(req.num_pending, budget)
        chunk = req.tokens[req.num_computed:req.num_computed + count]
        while True:
            pairs = self.manager.allocate_slots(req.seq_id, count, token_ids=chunk)
            if pairs is not None:
                break
            if running is None:
                return None
            victim = running.pop()
            self._preempt(victim)
            waiting.appendleft(victim)
            if victim is req:
                return None
        self.manager.apply_copies(pairs)
        start = self.manager.num_cached_tokens(req.seq_id) if fresh else req.num_computed
        return req, start, req.num_computed + count - start

    def _preempt(self, req: _Request) -> None:
        mode = self.preemption_mode
        if mode == "swap" and not self.manager.can_swap_out(req.seq_id):
            mode = "recompute"
        if self.manager.preempt(req.seq_id, mode) == "recompute":
            req.num_computed = 0
        else:
            req.swapped = True

    # ---- one step ------------------------------------------------------------------------

    def _inputs(self, batch: list[tuple[_Request, int, int]]) -> StepInputs:
        ids = [r.seq_id for r, _, _ in batch]
        counts = [n for _, _, n in batch]
        indptr = np.zeros(len(batch) + 1, np.int32)
        indptr[1:] = np.cumsum(counts)
        return StepInputs(
            input_ids=np.array([t for r, s, n in batch for t in r.tokens[s:s + n]], np.int64),
            positions=np.concatenate([np.arange(s, s + n) for _, s, n in batch]).astype(np.int64),
            block_tables=self.manager.block_tables(ids),
            slot_mapping=self.manager.slot_mappings(ids, counts),
            q_indptr=indptr,
            seq_lens=np.array([s + n for _, s, n in batch], np.int32),
        )

    def _append(self, req: _Request, logits: np.ndarray, running: list) -> None:
        p, out = req.params, req.output
        if p.return_logits:
            out.logits.append(logits.copy())
        if p.temperature == 0.0:
            token = int(np.argmax(logits))
        else:
            z = logits.astype(np.float64) / p.temperature
            prob = np.exp(z - z.max())
            token = int(req.rng.choice(len(prob), p=prob / prob.sum()))
        req.tokens.append(token)
        out.token_ids.append(token)
        eos = self.model.eos_token_id
        if token == eos and not p.ignore_eos:
            out.finish_reason = "stop"
        elif len(out.token_ids) >= p.max_tokens:
            out.finish_reason = "length"
        if out.finish_reason is not None:
            self.manager.free(req.seq_id)
            running.remove(req)

    def _request(self, prompt, params: SamplingParams) -> _Request:
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise ShapeError("a prompt is empty; pass at least one token id")
        bad = [t for t in tokens if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ShapeError(f"token id {bad[0]} is outside the vocabulary 0..{self.model.vocab_size - 1}")
        self._next_id += 1
        return _Request(self._next_id, tokens, params, RequestOutput(list(tokens)),
                        np.random.default_rng(params.seed))
