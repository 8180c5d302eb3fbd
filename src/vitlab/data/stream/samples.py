"""What a streaming worker hands back: one decoded sample (or the name of a file it could not read), and batches of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One decoded image as uint8 (3, S, S), or None with `error` set when the file could not be read."""

    image: torch.Tensor | None
    label: int
    index: int
    name: str
    real: bool = True  # False for the padding that evens out evaluation shards across ranks
    error: str | None = None


@dataclass
class Batch:
    """Images (N, 3, S, S) uint8, labels (N,), dataset indices (N,), `real` (N,) (False: evaluation padding).

    `bad` lists (name, reason) of the files of this batch that could not be decoded; they are not in
    the tensors, so N can be smaller than the batch size.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    real: torch.Tensor
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> Batch:
        """The same batch in page-locked memory (DataLoader's pin_memory thread calls this)."""
        return Batch(*(t.pin_memory() for t in (self.images, self.labels, self.indices, self.real)), self.bad)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """The batch's tensors on `device`."""
        moved = (t.to(device, non_blocking=non_blocking) for t in (self.images, self.labels, self.indices, self.real))
        return Batch(*moved, self.bad)


def collate(samples: list[Sample]) -> Batch:
    """Stack the decoded samples into a Batch; samples that failed to decode are dropped and listed in `bad`."""
    good = [s for s in samples if s.image is not None]
    bad = [(s.name, s.error or "unreadable") for s in samples if s.image is None]
    images = torch.stack([s.image for s in good]) if good else torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
    return Batch(
        images=images,
        labels=torch.tensor([s.label for s in good], dtype=torch.int64),
        indices=torch.tensor([s.index for s in good], dtype=torch.int64),
        real=torch.tensor([s.real for s in good], dtype=torch.bool),
        bad=bad,
    )
