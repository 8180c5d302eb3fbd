"""Image folders: `root/train/<class>/*.png|jpg|jpeg` and `root/test/<class>/...`, held as uint8 tensors.

Every image is decoded with Pillow, converted to RGB and resized to a square `image_size`
with bicubic resampling. Classes are the sub-folder names, sorted; train and test must list
the same ones.

Unusable images are skipped: unreadable ones (corrupt, truncated, not an image at all), ones over
`max_pixels` (a decompression-bomb guard), and links that lead outside `root`. One warning per
`folder_splits` call says how many were skipped and names the first few with the reason. A class
folder with no image files, or whose every image is unusable, is an error. 16-bit greyscale PNGs
are scaled to 8 bits. Decoding runs on torch's thread count, which `train.threads` sets.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from vitlab.data.dataset import DataSplits, ImageDataset
from vitlab.data.images import IMAGE_SUFFIXES, MAX_PIXELS, UnusableImage, decode_images, listed_images, named
from vitlab.errors import VitlabError


def _layout(root: Path) -> str:
    return (
        f"expected {root}/train/<class>/*.png|jpg|jpeg and {root}/test/<class>/*.png|jpg|jpeg, "
        "one sub-folder per class, the same classes in both splits"
    )


def _class_names(split: Path) -> list[str]:
    names = sorted(p.name for p in split.iterdir() if p.is_dir())
    if not names:
        raise VitlabError(f"{split} has no class sub-folders; {_layout(split.parent)}")
    return names


def _load_split(split: Path, classes: list[str], image_size: int, max_pixels: int, skipped: list[str]) -> ImageDataset:
    """Decode one split; a note for each unusable file is appended to skipped."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found, outside = listed_images(split / name, split.parent)
        if not found and not outside:
            raise VitlabError(f"class folder {split / name} holds no {'/'.join(IMAGE_SUFFIXES)} images; add some or remove it")
        files += found
        labels += [label] * len(found)
        skipped += outside
    dataset = decoded_dataset(decode_images(files, image_size, max_pixels), labels, classes, skipped)
    empty = [name for label, name in enumerate(classes) if not (dataset.labels == label).any()]
    if empty:
        raise VitlabError(
            f"every image in {[str(split / name) for name in empty]} is unusable (unreadable, over "
            f"{max_pixels} pixels, or a link outside the root); replace the files"
        )
    return dataset


def decoded_dataset(
    decoded: list[np.ndarray | UnusableImage], labels: list[int], classes: list[str], skipped: list[str]
) -> ImageDataset:
    """The usable images of `decoded` (of decode_images) with their labels; a note for each unusable one goes to skipped."""
    usable = [i for i, array in enumerate(decoded) if isinstance(array, np.ndarray)]
    skipped += [str(array) for array in decoded if isinstance(array, UnusableImage)]
    kept = torch.tensor([labels[i] for i in usable], dtype=torch.int64)
    if not usable:
        return ImageDataset(torch.zeros(0, 3, 0, 0, dtype=torch.uint8), kept, classes)
    images = torch.from_numpy(np.stack([decoded[i] for i in usable])).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images=images, labels=kept, classes=classes)


def folder_splits(root: str | Path, image_size: int, max_pixels: int = MAX_PIXELS) -> DataSplits:
    """Train and test splits read from `root/train/<class>/` and `root/test/<class>/`."""
    root = Path(root)
    if image_size < 1:
        raise VitlabError(f"image_size must be a positive number of pixels, got {image_size}")
    missing = [str(root / split) for split in ("train", "test") if not (root / split).is_dir()]
    if missing:
        raise VitlabError(f"missing folder(s) {missing}; {_layout(root)}")
    train_classes, test_classes = _class_names(root / "train"), _class_names(root / "test")
    if train_classes != test_classes:
        raise VitlabError(
            f"train and test class folders differ: only in train {sorted(set(train_classes) - set(test_classes))}, "
            f"only in test {sorted(set(test_classes) - set(train_classes))}; {_layout(root)}"
        )
    skipped: list[str] = []
    splits = DataSplits(
        train=_load_split(root / "train", train_classes, image_size, max_pixels, skipped),
        test=_load_split(root / "test", test_classes, image_size, max_pixels, skipped),
    )
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unusable image(s) under {root}: {named(skipped)}", stacklevel=2)
    return splits
