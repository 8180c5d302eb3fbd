"""The class names of a run's dataset, for predictions and exported models."""

from __future__ import annotations

from pathlib import Path

from vitlab.config import DataConfig
from vitlab.errors import VitlabError


def dataset_class_names(data: DataConfig) -> list[str] | None:
    """The class names of `data` without decoding its images where possible; None where they cannot be read."""
    if data.name == "builtin":
        from vitlab.data.builtin import BUILTIN_CLASSES

        return list(BUILTIN_CLASSES)
    if data.name == "folder":
        train = Path(data.root or "") / "train"
        return sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else None
    from vitlab.data import load_splits

    try:
        if data.name == "hf":
            from vitlab.data.hf import hf_classes

            return hf_classes(data.root, data.image_column, data.label_column)
        return load_splits(data.name, data.root, data.image_size).test.classes
    except VitlabError:  # the dataset is not on this machine
        return None


def class_names(data: DataConfig, num_classes: int, saved: list[str] | None = None) -> list[str]:
    """`saved` names (a checkpoint's), else the dataset's, else `class 0`, `class 1`, …; always `num_classes` of them."""
    for names in (saved, dataset_class_names(data)):
        if names is not None and len(names) == num_classes:
            return list(names)
    return [f"class {i}" for i in range(num_classes)]
