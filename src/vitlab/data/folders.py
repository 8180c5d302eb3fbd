"""Image folders: `root/train/<class>/*.png|jpg|jpeg` and `root/test/<class>/...`, held as uint8 tensors.

Every image is decoded with Pillow, converted to RGB and resized to a square `image_size`
with bicubic resampling. Classes are the sub-folder names, sorted; train and test must list
the same ones.

Unreadable images (corrupt, truncated, or not an image at all): each is skipped, and one
warning per `folder_splits` call says how many were skipped and names the first few. A class
folder with no image files, or whose every image is unreadable, is an error.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitlab.data.dataset import DataSplits, ImageDataset
from vitlab.errors import VitlabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SHOWN = 5  # unreadable files named in the warning


def _layout(root: Path) -> str:
    return (
        f"expected {root}/train/<class>/*.png|jpg|jpeg and {root}/test/<class>/*.png|jpg|jpeg, "
        "one sub-folder per class, the same classes in both splits"
    )


def decode_image(path: Path, image_size: int) -> np.ndarray | None:
    """The image as (image_size, image_size, 3) uint8, or None if Pillow cannot read it."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # decodes fully, so a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def _class_names(split: Path) -> list[str]:
    names = sorted(p.name for p in split.iterdir() if p.is_dir())
    if not names:
        raise VitlabError(f"{split} has no class sub-folders; {_layout(split.parent)}")
    return names


def _load_split(split: Path, classes: list[str], image_size: int, skipped: list[Path]) -> ImageDataset:
    """Decode one split; unreadable files are appended to skipped."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise VitlabError(
                f"class folder {split / name} holds no {'/'.join(IMAGE_SUFFIXES)} images; add some or remove it"
            )
        files += found
        labels += [label] * len(found)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # Pillow decodes without the GIL
        decoded = list(pool.map(lambda path: decode_image(path, image_size), files))
    readable = [i for i, array in enumerate(decoded) if array is not None]
    skipped += [files[i] for i, array in enumerate(decoded) if array is None]
    kept_labels = torch.tensor([labels[i] for i in readable], dtype=torch.int64)
    empty = [name for label, name in enumerate(classes) if not (kept_labels == label).any()]
    if empty:
        raise VitlabError(f"every image in {[str(split / name) for name in empty]} is unreadable; replace the files")
    images = torch.from_numpy(np.stack([decoded[i] for i in readable])).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images=images, labels=kept_labels, classes=classes)


def folder_splits(root: str | Path, image_size: int) -> DataSplits:
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
    skipped: list[Path] = []
    splits = DataSplits(
        train=_load_split(root / "train", train_classes, image_size, skipped),
        test=_load_split(root / "test", test_classes, image_size, skipped),
    )
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:_SHOWN]) + (", ..." if len(skipped) > _SHOWN else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) under {root}: {shown}", stacklevel=2)
    return splits
