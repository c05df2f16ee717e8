"""`LLM`: offline batch generation from a model package, on top of `Engine`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .engine import Engine
from .engine_outputs import RequestOutput
from .errors import ConfigError
from .sampling import SamplingParams


class LLM:
    """Generate from a package written by `pgen compile-model` (see `Engine` for the arguments)."""

    def __init__(self, package_path: str | Path, device: str = "cpu", **engine_args) -> None:
        self.engine = Engine(package_path, device, **engine_args)

    @property
    def model(self):
        return self.engine.model

    @property
    def manager(self):
        return self.engine.manager

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def pools(self) -> list[np.ndarray]:
        return self.engine.model.pools

    @property
    def kernels(self):
        return self.engine.model.kernels

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) in one continuous batch; one output per prompt.

        Args:
            sampling_params: one for all prompts, or one per prompt.

        Raises:
            ShapeError: an empty or over-long prompt, or a token id outside the vocabulary.
            ConfigError: as many sampling params as prompts are needed when a list is given.
            OutOfBlocksError: a request cannot fit in the whole pool.
        """
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ConfigError(f"{len(params)} sampling params for {len(prompts)} prompts; pass one, or one each")
        for prompt, p in zip(prompts, params):  # every request is checked before any is queued
            self.engine.check(self.engine.encode(prompt), p)
        outputs = [self.engine.add_request(prompt, p) for prompt, p in zip(prompts, params)]
        while not all(o.finished for o in outputs):
            self.engine.step()
        return outputs
