"""Datasets by name (in memory), the streamed pipeline for folders, shards and hf datasets, batch iteration and augmentation."""

from __future__ import annotations

from pathlib import Path

from vitlab.config import DATASETS
from vitlab.data.dataset import DataSplits, resize_splits
from vitlab.errors import VitlabError


def load_splits(
    name: str,
    root: str | Path | None = None,
    image_size: int = 32,
    download: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    **builtin_kwargs,
) -> DataSplits:
    """Train and test splits of a dataset by name; the columns are hf's, `builtin_kwargs` go to the built-in generator."""
    if name == "builtin":
        from vitlab.data.builtin import builtin_splits

        return builtin_splits(image_size=image_size, **builtin_kwargs)
    if name not in DATASETS:
        raise VitlabError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if name == "wds":
        raise VitlabError("WebDataset shards (wds) are streamed, never held in memory: leave data.stream at auto or true")
    if root is None:
        raise VitlabError(f"dataset {name!r} needs a root folder (data.root)")
    if name in ("cifar10", "cifar100"):
        from vitlab.data.cifar import cifar_splits

        splits = cifar_splits(name, root, download=download)
        return splits if image_size == 32 else resize_splits(splits, image_size)
    if name == "hf":
        from vitlab.data.hf import hf_splits

        return hf_splits(root, image_size, image_column, label_column)
    from vitlab.data.folders import folder_splits

    return folder_splits(root, image_size)
