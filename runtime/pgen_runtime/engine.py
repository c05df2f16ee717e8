"""`Engine`: requests in, completions out, one continuous-batching step at a time.

A request becomes one sequence for its prompt. Parallel sampling (`n > 1`) forks the prompt's
sequence once its prefill is done, so the n completions share the prompt's blocks and copy only
the last, partly filled block when they first write it. Beam search keeps `beam_width` sequences
that fork from and free each other every step (copy-on-write again); all beams of a request step
together, so a beam whose logits are ready waits for its siblings.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq_
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine_outputs import CompletionOutput, EngineStats, RequestOutput
from .errors import ConfigError, OutOfBlocksError, ShapeError
from .kv_cache_manager import KVCacheManager
from .model import PagedModel
from .preemption import PreemptionPolicy
from .sampling import SamplingParams, log_softmax, sample
from .scheduler import Scheduler, Seq
from .tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer


@dataclass(slots=True, eq=False)
class _Request:
    output: RequestOutput
    params: SamplingParams
    seqs: list[Seq] = field(default_factory=list)  # live sequences
    forked: bool = False
    ready: dict[int, np.ndarray] = field(default_factory=dict)  # beam: seq_id -> logits, until all are in
    hyps: list[tuple[float, list[int], str]] = field(default_factory=list)  # beam: finished hypotheses
    decoders: dict[int, IncrementalDecoder] = field(default_factory=dict)  # sampling: output index -> text


class Engine:
    """Generation over a model package with continuous batching.

    Args:
        package_path: a package written by `pgen compile-model`.
        device: "cpu", or "cuda:N" for a package compiled with a CUDA target.
        num_blocks: KV blocks per layer (null block included); default: room for 4096 tokens.
        num_host_blocks: host blocks for swapped-out sequences; default: as many as num_blocks.
        max_num_batched_tokens: tokens per step (decode tokens plus prefill chunks).
        max_num_seqs: sequences per step.
        preemption_mode: "swap" or "recompute" to force one; None lets the policy choose.
        enable_prefix_caching: reuse the KV of equal prompt prefixes across sequences.
        max_model_len: prompt + max_tokens limit; default: what one sequence can hold in the pool,
            at most the model's positions (its rotary or position-embedding table).
        tokenizer: default: the package's tokenizer.json, else byte-level.
    """

    def __init__(self, package_path: str | Path, device: str = "cpu", num_blocks: int | None = None,
                 num_host_blocks: int | None = None, max_num_batched_tokens: int = 256, max_num_seqs: int = 256,
                 preemption_mode: str | None = None, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None, tokenizer: Tokenizer | None = None) -> None:
        self.model = PagedModel(package_path, device, num_blocks)
        blocks = len(self.model.pools[0])
        self.manager = KVCacheManager(blocks, self.model.spec.block_size,
                                      num_host_blocks=blocks if num_host_blocks is None else num_host_blocks,
                                      enable_prefix_caching=enable_prefix_caching, kv=self.model,
                                      policy=PreemptionPolicy())
        self.scheduler = Scheduler(self.manager, max_num_batched_tokens, max_num_seqs, preemption_mode)
        self.tokenizer = tokenizer or load_tokenizer(self.model.root, self.model.vocab_size)
        capacity = (self.manager.block_pool.num_usable - self.manager.watermark_blocks) * self.manager.block_size
        positions = self.model.info.get("max_positions") or capacity
        if max_model_len is not None and not 1 <= max_model_len <= min(capacity, positions):
            raise ConfigError(f"max_model_len={max_model_len} must be in [1, {min(capacity, positions)}]: one "
                              f"sequence holds {capacity} tokens in the KV pool (raise num_blocks for more) and the "
                              f"model has {positions} positions")
        capacity = min(capacity, positions)
        self.max_model_len = max_model_len or capacity
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count(1)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def encode(self, prompt: str | Seq_[int]) -> list[int]:
        """Token ids of a prompt (text through the tokenizer, or ids checked against the vocabulary).

        Raises:
            ShapeError: an empty prompt, or an id outside the vocabulary.
        """
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise ShapeError("the prompt is empty; pass at least one token")
        bad = [t for t in tokens if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ShapeError(f"prompt token id {bad[0]} is outside the vocabulary 0..{self.model.vocab_size - 1}")
        return tokens

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise if a request can never run: too long for max_model_len, or beams beyond the pool.

        Raises:
            ShapeError: prompt + max_tokens exceed max_model_len.
            ConfigError: all beams of a beam search cannot fit in the pool at once.
        """
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ShapeError(f"the prompt has {len(prompt_ids)} tokens and max_tokens={params.max_tokens}: "
                             f"{total} > max_model_len={self.max_model_len}; shorten the prompt or lower max_tokens")
        if params.use_beam_search:
            per_beam = -(-total // self.manager.block_size)
            if params.beam_width * per_beam > self.manager.block_pool.num_usable:
                raise ConfigError(f"beam_width={params.beam_width} beams of {total} tokens need "
                                  f"{params.beam_width * per_beam} blocks, the pool holds "
                                  f"{self.manager.block_pool.num_usable}; lower beam_width or max_tokens")

    def add_request(self, prompt: str | Seq_[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> RequestOutput:
        """Queue a request; returns its output record, which `step` fills in.

        Raises:
            ShapeError, ConfigError: see `encode` and `check`. SequenceError: a duplicate request_id.
        """
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self.check(ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ConfigError(f"request_id={request_id!r} is already running; use a unique id")
        n = 0 if params.use_beam_search else params.n  # beam outputs are made when the search ends
        output = RequestOutput(request_id, prompt if isinstance(prompt, str) else None, list(ids),
                               [CompletionOutput(i) for i in range(n)], arrival_time=time.monotonic())
        req = _Request(output, params)
        self.requests[request_id] = req
        self.scheduler.add(self._start_seq(req, 0, list(ids)))
        return output

    def abort(self, request_id: str, error: str | None = None) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored.

        Args:
            error: why it failed; its completions then end with finish_reason "error" and no
                later prompt reuses its blocks from the prefix cache.
        """
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if error is not None:
                self.manager.forget_cached(seq.seq_id)
            self.scheduler.finish(seq)
        for out in req.output.outputs:
            out.finish_reason = out.finish_reason or ("abort" if error is None else "error")
        req.output.finished, req.output.error = True, error
        req.output.finished_time = time.monotonic()
        if error is None:
            self.stats.requests_aborted += 1
        else:
            self.stats.requests_failed += 1

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the outputs of the requests that got tokens (or finished).

        Raises:
            OutOfBlocksError: work is queued but nothing fits (a group larger than the pool).
        """
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work:
                raise OutOfBlocksError("no sequence could be scheduled; raise num_blocks or lower n/beam_width")
            return []
        start = time.perf_counter()
        try:
            logits = self.model.forward(self.scheduler.inputs(batch))
        except Exception as err:  # noqa: BLE001 - TVM raises RuntimeError/ValueError/... alike
            return self._fail(batch, err)
        touched: dict[str, _Request] = {}
        greedy = logits.argmax(axis=1).tolist()  # one call for the batch: most rows decode greedily
        for (seq, first, count), row, best in zip(batch, logits, greedy):
            seq.num_computed = first + count
            self.stats.tokens_computed += count
            if seq.num_pending == 0:
                req = seq.group
                if req.params.use_beam_search:
                    self._beam(req, seq, row)
                else:
                    self._sample(req, seq, row, best)
                touched[req.output.request_id] = req
        self.stats.record_step(time.perf_counter() - start, self.manager)
        for req in touched.values():
            if req.output.first_token_time is None:
                req.output.first_token_time = time.monotonic()
            if not req.seqs and not req.ready:
                self._finish(req)
        return [req.output for req in touched.values()]

    def _fail(self, batch, err: Exception) -> list[RequestOutput]:
        """A model step raised: fail the requests it ran (their KV may be half written), keep the rest.

        NOTE: a fault the model can detect (a bounds check, a TVM error, a refused input) raises
        here; a hard crash cannot be caught, which is why compiled code must be safe by construction.
        """
        failed = {seq.group.output.request_id: seq.group for seq, _, _ in batch}
        message = f"the model step failed: {type(err).__name__}: {err}"
        for request_id in failed:
            self.abort(request_id, error=message)
        return [req.output for req in failed.values()]

    # ---- sampling --------------------------------------------------------------------------

    def _start_seq(self, req: _Request, index: int, tokens: list[int]) -> Seq:
        seed = req.params.seed
        rng = np.random.default_rng(None if seed is None else [seed, index])
        seq = Seq(next(self._ids), tokens, req, index, rng=rng)
        req.seqs.append(seq)
        return seq

    def _sample(self, req: _Request, seq: Seq, row: np.ndarray, argmax: int) -> None:
        params = req.params
        if params.n > 1 and not req.forked:  # the prompt is in: fork it into the n completions
            req.forked = True
            children = [self._start_seq(req, i, list(seq.tokens)) for i in range(1, params.n)]
            for child in children:
                self.scheduler.fork(seq, child)
            for s in [seq, *children]:
                self._append(req, s, sample(row, params, s.rng, argmax), row)
            return
        self._append(req, seq, sample(row, params, seq.rng, argmax), row)

    def _append(self, req: _Request, seq: Seq, token: int, row: np.ndarray) -> None:
        params, out = req.params, req.output.outputs[seq.index]
        if params.return_logits:
            out.logits.append(row.copy())
        seq.tokens.append(token)
        out.token_ids.append(token)
        self.stats.tokens_generated += 1
        decoder = req.decoders.get(seq.index)
        if decoder is None:
            decoder = req.decoders[seq.index] = IncrementalDecoder(self.tokenizer)
        reason = "stop" if self._is_stop_token(params, token) else None
        if reason is None and len(out.token_ids) >= params.max_tokens:
            reason = "length"
        # Whole characters only while the sequence runs; at its end, the whole text.
        text = decoder.push(out.token_ids) if reason is None else decoder.final(out.token_ids)
        if params.stop:
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            if reason is None:  # hold back what may still become a stop string
                text = text[:len(text) - max(len(s) - 1 for s in params.stop)]
        out.text, out.finish_reason = text, reason
        if reason is not None:
            req.seqs.remove(seq)
            self.scheduler.finish(seq)

    def _is_stop_token(self, params: SamplingParams, token: int) -> bool:
        return (token == self.model.eos_token_id and not params.ignore_eos) or token in params.stop_token_ids

    def _beam(self, req: _Request, seq: Seq, row: np.ndarray) -> None:
        """Collect the beams' logits; once all are in, keep the beam_width best continuations."""
        req.ready[seq.seq_id] = row
        if len(req.ready) < len(req.seqs):
            return
        params, width = req.params, req.params.beam_width
        candidates = []
        for s in req.seqs:
            lp = log_softmax(req.ready[s.seq_id])
            for t in np.argsort(-lp, kind="stable")[:2 * width]:
                candidates.append((s.logprob + float(lp[t]), s, int(t)))
        req.ready.clear()
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep beam order, then token order
        chosen = []
        for rank, (score, s, t) in enumerate(candidates):
            ended = len(s.generated) + 1 >= params.max_tokens
            if ended or self._is_stop_token(params, t):
                if rank < width:  # a finished hypothesis counts only among the best `width`
                    req.hyps.append((score, [*s.generated, t], "length" if ended else "stop"))
                continue
            chosen.append((s, t, score))
            if len(chosen) == width:
                break
        req.hyps.sort(key=lambda h: -h[0])
        # Scores only fall as beams grow, so no live beam can beat `width` finished ones above it.
        done = not chosen or (len(req.hyps) >= width and chosen[0][2] <= req.hyps[width - 1][0])
        if done:
            for s in list(req.seqs):
                self.scheduler.finish(s)
            req.seqs = []
            return
        self._reassign_beams(req, chosen)

    def _reassign_beams(self, req: _Request, chosen: list[tuple[Seq, int, float]]) -> None:
        """Each continuation reuses its parent's sequence the first time, then forks it; unused ones go."""
        plan, used = [], set()
        for parent, token, score in chosen:  # NOTE: fork every child before any parent appends
            if parent.seq_id in used:
                child = Seq(next(self._ids), list(parent.tokens), req, rng=parent.rng)
                self.scheduler.fork(parent, child)
            else:
                child = parent
                used.add(parent.seq_id)
            plan.append((child, token, score, parent.generated))
        for s in req.seqs:
            if s.seq_id not in used:
                self.scheduler.finish(s)
        req.seqs = []
        for seq, token, score, generated in plan:
            seq.generated, seq.logprob = [*generated, token], score
            seq.tokens.append(token)
            req.seqs.append(seq)
        self.stats.tokens_generated += len(plan)

    def _finish(self, req: _Request) -> None:
        out = req.output
        if req.params.use_beam_search:
            out.outputs = [CompletionOutput(i, tokens, self.tokenizer.decode(tokens), reason, cumulative_logprob=score)
                           for i, (score, tokens, reason) in enumerate(req.hyps[:req.params.n])]
        out.finished = True
        out.finished_time = time.monotonic()
        self.stats.requests_finished += 1
        del self.requests[out.request_id]
