"""Images to inspect a model on: files from disk, or a few test images of the run's dataset."""

from __future__ import annotations

import torch

from vitlab.config import DataConfig
from vitlab.data import load_splits


def dataset_images(data: DataConfig, count: int) -> torch.Tensor:
    """The first `count` test images of a run's dataset, uint8 (count, C, H, W)."""
    splits = load_splits(
        data.name,
        data.root,
        data.image_size,
        num_train=1,
        num_test=count,
        seed=data.seed,
        image_column=data.image_column,
        label_column=data.label_column,
        **data.builtin,
    )
    return splits.test.images[:count]
