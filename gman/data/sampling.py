"""A shuffling sampler whose order depends only on (seed, epoch).

``torch.utils.data.RandomSampler`` draws its order from the global RNG, so
a run resumed from a checkpoint sees a different order than the run it
continues.  Here the permutation of epoch ``e`` is a pure function of
``(seed, e)``: Lightning calls ``set_epoch(e)`` on the sampler before every
training epoch, so an epoch replayed after a crash visits the windows in
exactly the order the interrupted run did.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededRandomSampler(Sampler[int]):
    """Random permutation of ``range(num_samples)`` drawn from a generator seeded with ``seed + epoch``."""

    def __init__(self, num_samples: int, seed: int = 0):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning's fit loop at the start of every epoch."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
