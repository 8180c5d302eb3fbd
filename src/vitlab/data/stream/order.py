"""Which samples a rank reads in an epoch, batch by batch: a function of (seed, epoch) only, restartable at any batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import Sampler

from vitlab.errors import VitlabError


class SampleKey(NamedTuple):
    """What the sampler hands the dataset: the sample's index, the epoch (it seeds augmentation), padding flag."""

    index: int
    epoch: int
    real: bool = True


class EpochBatchSampler(Sampler[list[SampleKey]]):
    """Batches of one rank's share of an epoch, from batch `start_batch` on (set with `set_epoch`).

    Training: the epoch's permutation depends only on (seed, epoch) (the same one as the in-memory
    BatchIterator), each rank takes a disjoint contiguous slice of n // world_size samples, and the
    incomplete last batch is dropped. Evaluation: the samples in order, strided across ranks; the last
    ranks are padded with repeats of the last sample (`real=False`) so that every rank runs the same
    number of batches; the last batch may be short.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, train: bool = True):
        if size < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise VitlabError(
                f"EpochBatchSampler needs size >= 1, batch_size >= 1 and 0 <= rank < world_size, got size={size}, "
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        if train and size // world_size < batch_size:
            raise VitlabError(f"{size} samples over {world_size} rank(s) do not fill one batch of {batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.train = rank, world_size, train
        self.epoch, self.start_batch = 0, 0

    @property
    def shard_size(self) -> int:
        """Samples per rank and epoch (evaluation: with padding)."""
        return self.size // self.world_size if self.train else -(-self.size // self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank and epoch."""
        full, rest = divmod(self.shard_size, self.batch_size)
        return full + (rest > 0 and not self.train)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Serve `epoch` from batch number `start_batch` on, at the next iteration."""
        if epoch < 0 or not 0 <= start_batch <= self.steps_per_epoch:
            raise VitlabError(f"start_batch={start_batch} is outside the epoch's 0..{self.steps_per_epoch} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def shard_indices(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's sample indices of `epoch` in the order they are served, and which are real (not padding)."""
        if self.train:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            mine = order[self.rank * self.shard_size : (self.rank + 1) * self.shard_size]
            return mine, torch.ones_like(mine, dtype=torch.bool)
        positions = torch.arange(self.shard_size) * self.world_size + self.rank
        return positions.clamp(max=self.size - 1), positions < self.size

    def __iter__(self) -> Iterator[list[SampleKey]]:
        indices, real = self.shard_indices(self.epoch)
        for step in range(self.start_batch, self.steps_per_epoch):
            window = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield [SampleKey(i, self.epoch, r) for i, r in zip(indices[window].tolist(), real[window].tolist())]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch
