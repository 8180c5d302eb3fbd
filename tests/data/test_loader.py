"""Batch iteration: seeded per-epoch order, exact resume, and sharding across ranks."""

from __future__ import annotations

import pytest
import torch

from vitlab.data.dataset import ImageDataset
from vitlab.data.loader import BatchIterator
from vitlab.errors import VitlabError


def _dataset(n: int = 103) -> ImageDataset:
    """Image i holds the value i % 256 everywhere; label i % 7."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageDataset(images=images, labels=torch.arange(n) % 7, classes=[str(k) for k in range(7)])


def _order(loader: BatchIterator, epoch: int, start_step: int = 0) -> list[int]:
    return [i for *_, idx in loader.epoch_batches(epoch, start_step, with_indices=True) for i in idx.tolist()]


def test_batches_hold_the_indexed_examples() -> None:
    data = _dataset()
    loader = BatchIterator(data, batch_size=10, seed=3)
    for images, labels, idx in loader.epoch_batches(0, with_indices=True):
        assert images.shape == (10, 3, 2, 2) and images.dtype == torch.uint8
        assert torch.equal(images, data.images[idx]) and torch.equal(labels, data.labels[idx])


def test_order_depends_only_on_seed_and_epoch() -> None:
    data = _dataset()
    a, b = BatchIterator(data, 10, seed=3), BatchIterator(data, 10, seed=3)
    assert _order(a, 0) == _order(b, 0)
    assert _order(a, 1) == _order(b, 1)
    assert _order(a, 0) != _order(a, 1)
    assert _order(a, 0) != _order(BatchIterator(data, 10, seed=4), 0)


def test_training_drops_the_last_incomplete_batch() -> None:
    loader = BatchIterator(_dataset(103), batch_size=10)
    assert loader.steps_per_epoch == 10
    order = _order(loader, 0)
    assert len(order) == 100 and len(set(order)) == 100


def test_start_step_skips_exactly_that_many_batches() -> None:
    loader = BatchIterator(_dataset(), batch_size=10, seed=1)
    full = _order(loader, 2)
    assert _order(loader, 2, start_step=4) == full[40:]
    assert _order(loader, 2, start_step=loader.steps_per_epoch) == []
    with pytest.raises(VitlabError, match="start_step=11"):
        list(loader.epoch_batches(2, start_step=11))


def test_training_shards_are_disjoint_equal_and_from_one_permutation() -> None:
    data = _dataset(103)
    shards = [_order(BatchIterator(data, 8, seed=5, rank=r, world_size=3), 1) for r in range(3)]
    assert [len(s) for s in shards] == [32, 32, 32]  # 103 // 3 = 34 per rank, 4 batches of 8
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat)
    whole = BatchIterator(data, 8, seed=5).shard_indices(1).tolist()
    assert set(flat) <= set(whole)


def test_evaluation_covers_every_example_once_across_ranks() -> None:
    data = _dataset(103)
    loaders = [BatchIterator(data, 8, rank=r, world_size=4, train=False) for r in range(4)]
    assert len({loader.steps_per_epoch for loader in loaders}) == 1, "every rank runs the same number of batches"
    served = [i for loader in loaders for i in _order(loader, 0)]
    assert sorted(set(served)) == list(range(103))
    assert len(served) - 103 == 4 * 26 - 103, "only the documented padding repeats examples"
    single = BatchIterator(data, 8, train=False)
    assert _order(single, 0) == list(range(103)) == _order(single, 5)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(VitlabError, match="rank"):
        BatchIterator(_dataset(), 8, rank=2, world_size=2)
    with pytest.raises(VitlabError, match="batch_size"):
        BatchIterator(_dataset(), 0)
