"""Image folders read lazily: `root/train/<class>/…`, evaluation from `root/test/` or `root/val/`, a minival held out of train.

Only the file table (paths as one NumPy byte array, labels as one int64 array) lives in memory, so
DataLoader workers forked from the process share it without copy-on-write growth; each item is
decoded when a worker asks for it. Training augmentation (crop, flip) draws from a NumPy generator
seeded with (seed, epoch, sample index) alone, never from the worker's state, so a batch is the same
whichever worker builds it and whenever the epoch was started.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from vitlab.data.images import DECODE_ERRORS, IMAGE_SUFFIXES, listed_images, named
from vitlab.data.stream.crops import CropDecoder
from vitlab.data.stream.order import SampleKey
from vitlab.data.stream.samples import Sample
from vitlab.errors import VitlabError

EVAL_SPLITS = ("test", "val")  # the first that exists is the evaluation split; ImageNet ships val/


@dataclass(frozen=True)
class FileTable:
    """Image paths relative to `root` (a NumPy byte-string array), their labels, and the class names."""

    root: Path
    files: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: np.ndarray) -> FileTable:
        """The table restricted to `indices`, in that order."""
        return replace(self, files=self.files[indices], labels=self.labels[indices])

    def path(self, index: int) -> Path:
        """The full path of sample `index`."""
        return self.root / os.fsdecode(self.files[index])

    def source(self, index: int) -> Path:
        """What the decoder opens for sample `index`: its file."""
        return self.path(index)

    def name(self, index: int) -> str:
        """Sample `index` in messages: its path below the split."""
        return os.fsdecode(self.files[index])


def scan_split(split: str | Path, classes: tuple[str, ...] | None = None) -> FileTable:
    """The images of `split/<class>/` (.png/.jpg/.jpeg, any case), sorted; `classes` fixes the class list.

    Links leading outside the dataset root (`split`'s parent) are skipped with one warning, as the in-memory reader does.
    """
    split = Path(split)
    if not split.is_dir():
        raise VitlabError(f"{split} is not a folder; expected {split}/<class>/*.jpg, one sub-folder per class")
    found = tuple(sorted(entry.name for entry in os.scandir(split) if entry.is_dir()))
    if not found:
        raise VitlabError(f"{split} has no class sub-folders; expected {split}/<class>/*.jpg")
    if classes is not None and found != classes:
        raise VitlabError(
            f"{split} has other class folders than train: missing {sorted(set(classes) - set(found))}, "
            f"extra {sorted(set(found) - set(classes))}"
        )
    files, labels, skipped = [], [], []
    for label, name in enumerate(found):
        paths, outside = listed_images(split / name, split.parent)
        if not paths:
            held = f"no {'/'.join(IMAGE_SUFFIXES)} images; add some or remove it"
            if outside:
                held = f"only links outside {split.parent}; copy the files in"
            raise VitlabError(f"class folder {split / name} holds {held}")
        files += [os.fsencode(f"{name}/{path.name}") for path in paths]
        labels += [label] * len(paths)
        skipped += outside
    if skipped:
        warnings.warn(f"skipped {len(skipped)} image(s) under {split}: {named(skipped)}", stacklevel=2)
    return FileTable(split, np.array(files, dtype=np.bytes_), np.array(labels, dtype=np.int64), found)


def holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): round(fraction * n_c) samples of every class c, drawn by `seed`, held out.

    Like big_vision's `train[99%:]` minival, but stratified and shuffled, so it does not depend on file order.
    """
    if not 0 <= fraction < 1:
        raise VitlabError(f"data.val_fraction must lie in [0, 1), got {fraction}")
    rng = np.random.default_rng([abs(seed), 7])
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        held.append(rng.permutation(members)[: round(fraction * len(members))])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


class SampleTable(Protocol):
    """What a FolderStream reads: a FileTable, or a Hugging Face split (vitlab.data.hf.ArrowTable)."""

    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int: ...
    def subset(self, indices: np.ndarray) -> SampleTable: ...
    def source(self, index: int) -> Path | BinaryIO: ...
    def name(self, index: int) -> str: ...


class FolderStream:
    """Map-style dataset: item SampleKey(index, epoch) -> Sample, decoded and cropped on demand."""

    def __init__(self, table: SampleTable, decoder: CropDecoder, seed: int = 0):
        if seed < 0:
            raise VitlabError(f"the augmentation seed must be >= 0, got {seed}")
        self.table, self.decoder, self.seed = table, decoder, seed

    @property
    def train(self) -> bool:
        """Whether items get the random training crop."""
        return self.decoder.train

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in label order."""
        return self.table.classes

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: SampleKey) -> Sample:
        index, epoch, real = key
        name, label = self.table.name(index), int(self.table.labels[index])
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        try:
            image = self.decoder(self.table.source(index), rng)
        except DECODE_ERRORS as exc:
            return Sample(None, label, index, name, real, f"{type(exc).__name__}: {exc}")
        return Sample(image, label, index, name, real)


@dataclass
class StreamSplits:
    """Streaming train split, minival held out of it (None when val_fraction is 0) and the evaluation split."""

    train: FolderStream
    minival: FolderStream | None
    test: FolderStream


def stream_splits(
    root: str | Path,
    image_size: int = 224,
    val_fraction: float = 0.0,
    seed: int = 0,
    crop_fraction: float = 0.875,
    scale: tuple[float, float] = (0.08, 1.0),
) -> StreamSplits:
    """Train (Inception crop + flip), minival and test (centre crop) streams of `root`."""
    root = Path(root)
    evaluation = next((root / s for s in EVAL_SPLITS if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or evaluation is None:
        raise VitlabError(f"expected {root}/train/<class>/*.jpg and {root}/test/<class>/… or {root}/val/<class>/…")
    train_table = scan_split(root / "train")
    test_table = scan_split(evaluation, train_table.classes)
    return table_splits(train_table, test_table, image_size, val_fraction, seed, crop_fraction, scale)


def table_splits(
    train: SampleTable,
    test: SampleTable,
    image_size: int,
    val_fraction: float,
    seed: int,
    crop_fraction: float,
    scale: tuple[float, float],
) -> StreamSplits:
    """Train (Inception crop + flip), a minival held out of it, and test (centre crop) streams of two tables."""
    train_crop = CropDecoder(image_size, train=True, scale=scale, crop_fraction=crop_fraction)
    eval_crop = replace(train_crop, train=False)
    kept, held = holdout(train.labels, val_fraction, seed)
    return StreamSplits(
        train=FolderStream(train.subset(kept), train_crop, seed),
        minival=FolderStream(train.subset(held), eval_crop, seed) if len(held) else None,
        test=FolderStream(test, eval_crop, seed),
    )
