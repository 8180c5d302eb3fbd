"""Images to inspect a model on: files from disk, or a few test images of the run's dataset."""

from __future__ import annotations

from pathlib import Path

import torch

from vitlab.config import DataConfig
from vitlab.data import load_splits
from vitlab.data.folders import UnusableImage, decode_image
from vitlab.errors import VitlabError


def read_images(paths: list[str | Path], image_size: int) -> torch.Tensor:
    """Image files as a uint8 batch (B, 3, image_size, image_size), resized bicubically; unusable ones are an error."""
    arrays = []
    for path in paths:
        try:
            array = decode_image(Path(path), image_size)
        except UnusableImage as exc:
            raise VitlabError(f"cannot use {exc}") from exc
        arrays.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
    return torch.stack(arrays)


def dataset_images(data: DataConfig, count: int) -> torch.Tensor:
    """The first `count` test images of a run's dataset, uint8 (count, C, H, W)."""
    splits = load_splits(data.name, data.root, data.image_size, num_train=1, num_test=count, seed=data.seed,
                         **data.builtin)  # fmt: skip
    return splits.test.images[:count]
