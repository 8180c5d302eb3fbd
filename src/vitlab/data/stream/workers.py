"""DataLoader workers for the streaming datasets: one epoch at a time, restartable at any batch, errors made plain."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

import torch
from torch.utils.data import DataLoader

from vitlab.data.stream.files import FolderStream
from vitlab.data.stream.order import EpochBatchSampler
from vitlab.data.stream.samples import Batch, collate
from vitlab.errors import VitlabError

T = TypeVar("T")
_WORKER_FAILURES = ("DataLoader worker", "DataLoader timed out")


class EpochSource(Protocol):
    """What decides an epoch's samples: the folder sampler, or the shard stream."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


class StreamLoader:
    """Batches of one rank, epoch by epoch: `for batch in loader.epoch(epoch, start_batch): ...`.

    Files that could not be decoded are dropped from their batch and listed, as (name, reason), in
    `bad_files` (reset when an epoch starts, complete when it ends). A worker that dies, or no batch
    within `timeout_s`, raises one VitlabError; so does a batch in which no file could be read.
    """

    def __init__(self, loader: DataLoader, source: EpochSource, steps_per_epoch: int):
        self.loader, self.source, self.steps_per_epoch = loader, source, steps_per_epoch
        self.bad_files: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from batch number `start_batch` on."""
        self.source.set_epoch(epoch, start_batch)
        self.bad_files = []
        batches = iter(self.loader)
        for step in range(start_batch, self.steps_per_epoch):
            try:
                batch = next(batches)
            except StopIteration:
                return
            except VitlabError as exc:  # raised in a worker: keep the message, not the worker's traceback
                raise VitlabError(_first_message(str(exc))) from None
            except RuntimeError as exc:
                if not any(failure in str(exc) for failure in _WORKER_FAILURES):
                    raise
                raise VitlabError(f"data loading failed in epoch {epoch} at batch {step}: {exc}".splitlines()[0]) from None
            self.bad_files += batch.bad
            if not len(batch):
                names = ", ".join(name for name, _ in batch.bad[:3])
                raise VitlabError(f"no image of batch {step} of epoch {epoch} could be read (e.g. {names}): {batch.bad[0][1]}")
            yield batch


def _first_message(text: str) -> str:
    """The error line of a worker's re-raised 'Caught VitlabError …' text (the text itself when it is one line)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text
    return last.split("VitlabError: ", 1)[-1]


def make_loader(
    dataset: FolderStream,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 4,
    prefetch_factor: int = 2,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
    timeout_s: float = 600.0,
) -> StreamLoader:
    """A StreamLoader over a FolderStream: per-rank batches of `batch_size`, decoded in `workers` processes.

    Train or evaluation order follows `dataset.train` (see EpochBatchSampler). Page-locked memory
    defaults to on where CUDA is available. The DataLoader draws its worker seeds from its own
    generator, so iterating it leaves the global torch RNG (dropout, mixup) untouched.
    """
    if workers < 0 or prefetch_factor < 1:
        raise VitlabError(f"make_loader needs workers >= 0 and prefetch_factor >= 1, got {workers}, {prefetch_factor}")
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world_size, train=dataset.train)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=persistent_workers and workers > 0,
        timeout=timeout_s if workers else 0,
        generator=torch.Generator().manual_seed(seed),
    )
    return StreamLoader(loader, sampler, sampler.steps_per_epoch)


class DataWait:
    """Share of wall time spent waiting for the next batch: wrap the epoch's batches, read `fraction` at its end."""

    def __init__(self) -> None:
        self.waited, self.started = 0.0, time.perf_counter()

    def reset(self) -> None:
        """Start a new measurement (e.g. at the start of an epoch)."""
        self.waited, self.started = 0.0, time.perf_counter()

    def wrap(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield from `batches`, adding the time each `next` took to `waited`."""
        iterator = iter(batches)
        while True:
            begin = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self.waited += time.perf_counter() - begin
                return
            self.waited += time.perf_counter() - begin
            yield item

    @property
    def elapsed(self) -> float:
        """Seconds since the last reset."""
        return time.perf_counter() - self.started

    @property
    def fraction(self) -> float:
        """Waited seconds over elapsed seconds since the last reset."""
        return self.waited / max(self.elapsed, 1e-9)
