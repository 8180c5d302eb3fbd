"""Batches from an in-memory dataset: per-epoch shuffles derived from (seed, epoch), sharded by rank."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vitlab.data.dataset import ImageDataset
from vitlab.errors import VitlabError


class BatchIterator:
    """Yield (uint8 images, labels) batches of one rank's shard of an epoch.

    Training (`train=True`): the epoch's permutation depends only on (seed, epoch), each rank
    takes a disjoint, equal slice of it, and the incomplete last batch is dropped, so a run can
    restart exactly at any (epoch, step). Evaluation (`train=False`): the data in order, split
    into equal strided shards; the last shards are padded by repeating examples so that every
    rank runs the same number of batches (`with_indices` lets the caller undo the padding).
    """

    def __init__(
        self, dataset: ImageDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, train: bool = True
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise VitlabError(
                f"BatchIterator needs batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                f"rank={rank}, world_size={world_size}"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.train = rank, world_size, train

    @property
    def shard_size(self) -> int:
        """Examples per rank and epoch."""
        n = len(self.dataset)
        return n // self.world_size if self.train else -(-n // self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank and epoch."""
        if self.train:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def shard_indices(self, epoch: int) -> torch.Tensor:
        """This rank's example indices for `epoch`, in the order they are served."""
        n = len(self.dataset)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            return order[self.rank * self.shard_size : (self.rank + 1) * self.shard_size]
        positions = torch.arange(self.shard_size) * self.world_size + self.rank
        return positions.clamp(max=n - 1)

    def epoch_batches(self, epoch: int, start_step: int = 0, with_indices: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of `epoch` from batch number `start_step` on."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise VitlabError(f"start_step={start_step} is outside the epoch's 0..{self.steps_per_epoch} batches")
        indices = self.shard_indices(epoch)
        for step in range(start_step, self.steps_per_epoch):
            idx = indices[step * self.batch_size : (step + 1) * self.batch_size]
            batch = (self.dataset.images[idx], self.dataset.labels[idx])
            yield (*batch, idx) if with_indices else batch
