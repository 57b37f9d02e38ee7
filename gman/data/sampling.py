"""A shuffling sampler whose order depends only on (seed, epoch).

``torch.utils.data.RandomSampler`` draws its order from the global RNG, so
a run resumed from a checkpoint sees a different order than the run it
continues.  Here the permutation of epoch ``e`` is a pure function of
``(seed, e)``: Lightning calls ``set_epoch(e)`` on the sampler before every
training epoch, so an epoch replayed after a crash visits the windows in
exactly the order the interrupted run did.

Under DDP (``W`` processes), :class:`ShardedEpochSampler` deals that same
order out round-robin: rank ``r`` takes positions ``r, r + W, r + 2W, ...``.
With a per-process batch ``b`` the ranks' step-``i`` batches together are
then exactly the step-``i`` batch of one process with batch ``W·b``.  It is a
``DistributedSampler``, which Lightning leaves as it is (any other training
sampler it wraps in a ``DistributedSamplerWrapper`` that re-shuffles it).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler, Sampler


class EpochSeededRandomSampler(Sampler[int]):
    """Random permutation of ``range(num_samples)`` drawn from a generator seeded with
    ``seed · 1,000,003 + epoch`` (not ``seed + epoch``, which gives seed 1 at epoch 0 the order of
    seed 0 at epoch 1)."""

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
        generator.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardedEpochSampler(DistributedSampler):
    """Rank ``rank``'s share of the :class:`EpochSeededRandomSampler` order of epoch ``e``.

    The order is padded at the end with its own first positions to a multiple
    of ``num_replicas`` (as ``DistributedSampler`` pads), so every rank yields
    ``ceil(num_samples / num_replicas)`` indices and takes the same number of steps.
    With ``num_replicas = 1`` it yields exactly the 1-process order.
    """

    def __init__(self, num_samples: int, num_replicas: int, rank: int, seed: int = 0):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {num_replicas}")
        super().__init__(range(int(num_samples)), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=False)
        self.order = EpochSeededRandomSampler(num_samples, seed)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(self.order)
        while order and len(order) < self.total_size:  # pad (repeating, if fewer samples than ranks)
            order += order[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])
