"""The data of a classification run, built from its config: held in memory, or streamed from folders or shards.

Whatever the source, training yields uint8 batches `(images, labels)` of one rank, epoch by epoch and
restartable at any batch, and each evaluation split yields `(images, labels, dataset indices)` over
the whole split, strided across ranks. In memory: the built-in data, CIFAR, small image folders and
Hugging Face datasets (decoded once; random crops and flips run batched in the loop). Streamed: image
folders and Hugging Face datasets decoded per image in DataLoader workers (Inception crop and flip
there) and WebDataset shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vitlab.data import load_splits
from vitlab.data.dataset import ImageDataset
from vitlab.data.loader import BatchIterator
from vitlab.errors import VitlabError
from vitlab.runtime import distributed

STREAM_ABOVE_PX = 64  # `data.stream: auto` streams image folders above this size (32-px sets decode faster whole)
MAX_AUTO_WORKERS = 8  # `data.workers: auto` starts at most this many DataLoader processes per rank


def streams(data) -> bool:
    """Whether the run's data is streamed: `data.stream`, or for `auto` shards, and folders or hf datasets of large images."""
    if data.stream == "auto":
        return data.name == "wds" or (data.name in ("folder", "hf") and data.image_size > STREAM_ABOVE_PX)
    return bool(data.stream)


def stream_workers(data, world_size: int, shards: int | None = None) -> tuple[int, str]:
    """DataLoader workers per rank for `data.workers`, and the start block's line on them.

    `auto`: min(this rank's share of the machine's CPUs, training shards per rank, MAX_AUTO_WORKERS), rank 0's
    choice on every rank (a shard epoch's length depends on it). `shards`: the training shards, None for folders.
    A number of workers that the shards cannot feed is an error naming the fix.
    """
    per_rank = None if shards is None else shards // world_size
    if data.workers != "auto":
        if per_rank and data.workers > per_rank:
            raise VitlabError(
                f"data.workers={data.workers}: {shards} training shard(s) over {world_size} rank(s) feed at most {per_rank} "
                f"worker(s) per rank; set --set data.workers={per_rank} (or auto), or write smaller shards (vitlab shard --max-count)"
            )
        return data.workers, f"{data.workers} per rank (data.workers)"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine share them
    limits = {f"{cpus} CPU(s) per rank": cpus, f"the cap of {MAX_AUTO_WORKERS}": MAX_AUTO_WORKERS}
    if per_rank is not None:
        limits[f"{per_rank} training shard(s) per rank"] = per_rank
    workers = distributed.broadcast_object(max(1, min(limits.values())))
    return workers, f"{workers} per rank (data.workers: auto, the smallest of {', '.join(limits)})"


class MemoryTrain:
    """Training batches of an in-memory dataset (see BatchIterator)."""

    bad_files: list[tuple[str, str]] = []

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, rank: int, world_size: int):
        self.iterator = BatchIterator(dataset, batch_size, seed=seed, rank=rank, world_size=world_size, train=True)
        self.steps_per_epoch = self.iterator.steps_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterator.epoch_batches(epoch, start)


class MemoryEval:
    """One evaluation split held in memory."""

    def __init__(self, dataset: ImageDataset):
        self.dataset, self.size = dataset, len(dataset)

    def batches(self, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        iterator = BatchIterator(self.dataset, batch_size, seed=0, rank=rank, world_size=world_size, train=False)
        return iterator.epoch_batches(0, with_indices=True)


class StreamTrain:
    """Training batches decoded in DataLoader workers (a StreamLoader over folders or shards)."""

    def __init__(self, loader):
        self.loader, self.steps_per_epoch = loader, loader.steps_per_epoch

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        return self.loader.bad_files

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader.epoch(epoch, start):
            yield batch.images, batch.labels


class StreamEval:
    """One evaluation split decoded in DataLoader workers (centre crops)."""

    def __init__(self, make_loader, size: int):
        self.make_loader, self.size = make_loader, size

    def batches(self, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.make_loader(batch_size, rank, world_size).epoch(0):
            yield batch.images, batch.labels, batch.indices


@dataclass
class RunData:
    """A run's training batches, its evaluation splits (test, and minival when held out), its classes, and `notes`:
    what was decided for it (e.g. the number of workers), as start block lines."""

    train: MemoryTrain | StreamTrain | None
    test: MemoryEval | StreamEval
    minival: MemoryEval | StreamEval | None
    classes: list[str]
    train_size: int
    streamed: bool
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def held_out(dataset: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset | None]:
    """Train minus a stratified minival of `fraction` of every class (big_vision's train[99%:]), and the minival."""
    if not fraction:
        return dataset, None
    from vitlab.data.stream.files import holdout

    kept, held = (torch.from_numpy(i) for i in holdout(dataset.labels.numpy(), fraction, seed))
    part = lambda idx: ImageDataset(dataset.images[idx], dataset.labels[idx], dataset.classes)  # noqa: E731
    return part(kept), part(held)


def run_data(
    data, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, train: bool = True, flip_prob: float = 0.5
) -> RunData:
    """The data of a run's `data` config: `batch_size` per rank, training order from `seed` (no training split if not `train`).

    `flip_prob`: streamed training images are flipped horizontally in the workers with this chance (in memory, the
    loop's augment_batch flips them).
    """
    if streams(data):
        return streamed_data(data, batch_size, seed, rank, world_size, train, flip_prob)
    if data.name == "wds":
        raise VitlabError("data.name=wds is always streamed; set data.stream to auto or true")
    splits = load_splits(
        data.name,
        data.root,
        data.image_size,
        data.download,
        data.image_column,
        data.label_column,
        num_train=data.num_train,
        num_test=data.num_test,
        seed=data.seed,
        **data.builtin,
    )
    train_split, minival = held_out(splits.train, data.val_fraction, data.seed)
    source = MemoryTrain(train_split, batch_size, seed, rank, world_size) if train else None
    return RunData(
        source,
        MemoryEval(splits.test),
        minival and MemoryEval(minival),
        list(splits.train.classes),
        len(train_split),
        streamed=False,
    )


def streamed_data(data, batch_size: int, seed: int, rank: int, world_size: int, train: bool, flip_prob: float = 0.5) -> RunData:
    """Folders, shards or hf datasets decoded in `data.workers` DataLoader workers per rank."""
    from vitlab.data.stream.crops import CropDecoder
    from vitlab.data.stream.workers import make_loader

    if data.name not in ("folder", "wds", "hf"):
        raise VitlabError(f"data.name={data.name!r} is held in memory; streaming (data.stream) is for folder, wds and hf")
    crop = CropDecoder(
        data.image_size, train=True, scale=tuple(data.crop_scale), flip_prob=flip_prob, crop_fraction=data.crop_fraction
    )
    centre = CropDecoder(data.image_size, train=False, crop_fraction=data.crop_fraction)
    if data.name == "wds":
        return shard_data(data, crop, centre, batch_size, seed, rank, world_size, train)
    from vitlab.data.stream.files import FolderStream, stream_splits, table_splits

    options = (data.image_size, data.val_fraction, data.seed, data.crop_fraction, tuple(data.crop_scale))
    if data.name == "hf":
        from vitlab.data.hf import hf_tables

        splits = table_splits(*hf_tables(data.root, data.image_column, data.label_column), *options)
    else:
        splits = stream_splits(data.root, *options)
    workers, said = stream_workers(data, world_size)

    def evaluation(stream: FolderStream) -> StreamEval:
        return StreamEval(lambda b, r, w: make_loader(stream, b, rank=r, world_size=w, workers=workers), len(stream))

    source = None
    if train:
        source = StreamTrain(
            make_loader(
                FolderStream(splits.train.table, crop, seed),
                batch_size,
                seed=seed,
                rank=rank,
                world_size=world_size,
                workers=workers,
            )
        )
    return RunData(
        source,
        evaluation(splits.test),
        splits.minival and evaluation(splits.minival),
        list(splits.train.classes),
        len(splits.train),
        streamed=True,
        notes={"workers": said},
    )


def shard_data(data, crop, centre, batch_size: int, seed: int, rank: int, world_size: int, train: bool) -> RunData:
    """WebDataset shards written by `vitlab shard`: `data.root` is their folder (with info.json)."""
    from vitlab.data.stream.shards import INFO, ShardStream, make_shard_loader, read_info, shard_paths

    root = Path(data.root)
    info = read_info(root / INFO)  # checked: plain shard names, counts, classes
    splits = info["splits"]

    def count(split: str) -> int:
        return sum(splits[split]["shards"].values())

    test = next((s for s in ("test", "val") if s in splits), None)
    if "train" not in splits or test is None:
        raise VitlabError(f"{root / INFO} lists no train and test/val shards; write them with `vitlab shard FOLDER {root}`")
    workers, said = stream_workers(data, world_size, len(splits["train"]["shards"]) if train else None)

    def evaluation(split: str) -> StreamEval:
        paths = shard_paths(root, info, split)

        def loader(b: int, r: int, w: int):
            return make_shard_loader(ShardStream(paths, centre, b, info=info, rank=r, world_size=w), workers=workers)

        return StreamEval(loader, count(split))

    source = None
    if train:
        stream = ShardStream(
            shard_paths(root, info, "train"), crop, batch_size, info=info, seed=seed, rank=rank, world_size=world_size
        )
        source = StreamTrain(make_shard_loader(stream, workers=workers))
    minival = evaluation("minival") if "minival" in splits else None
    return RunData(
        source, evaluation(test), minival, list(info["classes"]), count("train"), streamed=True, notes={"workers": said}
    )
