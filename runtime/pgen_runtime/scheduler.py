"""`Scheduler`: continuous batching over the paged KV cache, one step at a time.

One step schedules running sequences first (a decode token or the next prefill chunk each), then
admits waiting ones (new, swapped out, or preempted by recompute) while the token budget and the
KV pool allow; admission keeps the manager's watermark free. When a running sequence cannot grow,
the newest running sequence is preempted (nano-vllm's policy), by swap or recompute, and resumes
from the waiting queue's head once blocks free up. Prefix-cache hits skip the cached part of a
prompt; shared blocks are copied before they are written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError
from .kv_cache_manager import KVCacheManager
from .model import StepInputs


@dataclass(slots=True, eq=False)
class Seq:
    """One sequence the model runs: a completion of a request (or a beam), with its token ids.

    NOTE: `tokens` holds every token whose KV is or will be in the cache; the last sampled token
    is pending (its KV is computed by the next step that schedules it).
    """

    seq_id: int
    tokens: list[int]
    group: Any  # the engine's request record
    index: int = 0  # completion index within the request (beams: slot, reassigned each step)
    num_computed: int = 0  # leading tokens whose KV is in the cache
    swapped: bool = False
    rng: np.random.Generator | None = None
    logprob: float = 0.0  # beam search: cumulative log-probability of the generated tokens
    generated: list[int] = field(default_factory=list)

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed


Chunk = tuple[Seq, int, int]  # (sequence, first position of the chunk, tokens in it)


class Scheduler:
    """Picks each step's sequences and chunks under a token budget; owns the waiting/running queues.

    Args:
        manager: the KV cache manager (block tables, preemption).
        max_num_batched_tokens: tokens per step (decode tokens plus prefill chunks).
        max_num_seqs: sequences per step.
        preemption_mode: "swap" or "recompute" to force one; None lets the manager's policy choose.
    """

    def __init__(self, manager: KVCacheManager, max_num_batched_tokens: int = 256, max_num_seqs: int = 256,
                 preemption_mode: str | None = None) -> None:
        if isinstance(max_num_batched_tokens, bool) or not isinstance(max_num_batched_tokens, int) \
                or max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens={max_num_batched_tokens!r} must be an integer >= 1")
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs={max_num_seqs!r} must be an integer >= 1")
        if preemption_mode not in (None, "swap", "recompute"):
            raise ConfigError(f"preemption_mode={preemption_mode!r}; use 'swap', 'recompute' or None")
        self.manager = manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.preemption_mode = preemption_mode
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._preempted: set[int] = set()  # seq_ids preempted during the current `schedule`

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def fork(self, parent: Seq, child: Seq) -> None:
        """Start `child` sharing every block of the running `parent` (its tokens must equal the parent's)."""
        self.manager.fork(parent.seq_id, child.seq_id)
        child.num_computed = parent.num_computed
        self.running.append(child)

    def finish(self, seq: Seq) -> None:
        """Drop a sequence (finished or aborted) and release its blocks, wherever it is queued."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.seq_id in self.manager.seq_ids:
            self.manager.free(seq.seq_id)

    def schedule(self) -> list[Chunk]:
        """This step's chunks; sequences with nothing pending (beams waiting on siblings) are skipped."""
        budget, batch, queued = self.max_num_batched_tokens, [], len(self.waiting)
        self._preempted.clear()
        for seq in list(self.running):
            if budget == 0 or len(batch) == self.max_num_seqs:
                break
            if seq.seq_id in self._preempted or seq.num_pending == 0:  # preempted just now, or waiting
                continue
            chunk = self._allocate(seq, budget, preempt=True)
            if chunk is not None:
                batch.append(chunk)
                budget -= chunk[2]
        # Admit only when nothing was preempted: a preempted sequence must not bounce straight back.
        while self.waiting and budget > 0 and len(batch) < self.max_num_seqs and len(self.waiting) == queued:
            seq = self.waiting[0]
            if seq.swapped:  # back to the device first; it runs (or waits) from the running list
                if not self.manager.can_swap_in(seq.seq_id):
                    break
                self.manager.swap_in(seq.seq_id)
                seq.swapped = False
                self.running.append(self.waiting.popleft())
                queued -= 1
                chunk = self._allocate(seq, budget, preempt=False) if seq.num_pending else None
            else:
                chunk = self._allocate(seq, budget, preempt=False)
                if chunk is not None:
                    self.running.append(self.waiting.popleft())
                    queued -= 1
            if chunk is None:
                break
            batch.append(chunk)
            budget -= chunk[2]
        return batch

    def inputs(self, batch: list[Chunk]) -> StepInputs:
        """The model's flattened ragged batch for `batch`."""
        ids = [s.seq_id for s, _, _ in batch]
        counts = [n for _, _, n in batch]
        indptr = np.zeros(len(batch) + 1, np.int32)
        indptr[1:] = np.cumsum(counts)
        # Plain lists and one array each: most chunks are a single decode token, where a numpy call
        # per sequence would cost more than the work.
        tokens: list[int] = []
        positions: list[int] = []
        for seq, start, n in batch:
            tokens += seq.tokens[start:start + n]
            positions += range(start, start + n)
        return StepInputs(
            input_ids=np.array(tokens, np.int64),
            positions=np.array(positions, np.int64),
            block_tables=self.manager.block_tables(ids),
            slot_mapping=self.manager.slot_mappings(ids, counts),
            q_indptr=indptr,
            seq_lens=np.array([start + n for _, start, n in batch], np.int32),
        )

    def _allocate(self, seq: Seq, budget: int, preempt: bool) -> Chunk | None:
        """Reserve slots for the next chunk of `seq`, preempting the newest running ones if allowed."""
        fresh = seq.num_computed == 0
        count = min(seq.num_pending, budget)
        tokens = seq.tokens[seq.num_computed:seq.num_computed + count]
        while (pairs := self.manager.allocate_slots(seq.seq_id, count, token_ids=tokens)) is None:
            victim = self._victim(seq) if preempt else None
            if victim is None:
                return None
            self._preempt(victim)
            if victim is seq:
                return None
        if pairs:
            self.manager.apply_copies(pairs)
        start = self.manager.num_cached_tokens(seq.seq_id) if fresh else seq.num_computed
        return seq, start, seq.num_computed + count - start

    def _victim(self, seq: Seq) -> Seq | None:
        """The newest running sequence that is not a beam waiting on its siblings, else `seq` itself.

        NOTE: a waiting beam keeps its KV so that its siblings can fork from it when they catch up.
        """
        for victim in reversed(self.running):
            if victim is seq or victim.num_pending:
                return victim
        return None

    def _preempt(self, seq: Seq) -> None:
        mode = self.preemption_mode
        if mode == "swap" and not self.manager.can_swap_out(seq.seq_id):
            mode = "recompute"
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self._preempted.add(seq.seq_id)
        if self.manager.preempt(seq.seq_id, mode) == "recompute":
            seq.num_computed = 0
        else:
            seq.swapped = True
