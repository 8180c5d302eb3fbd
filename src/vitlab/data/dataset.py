"""In-memory image classification datasets: uint8 image tensors with int64 labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitlab.errors import VitlabError


@dataclass
class ImageDataset:
    """Images (N, C, H, W) uint8, labels (N,) int64 in [0, len(classes)), and class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise VitlabError(
                f"images must be a uint8 tensor of shape (N, C, H, W), got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}; convert with `.to(torch.uint8)` after scaling to 0..255"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise VitlabError(
                f"labels must be an int64 tensor of shape ({self.images.shape[0]},) to match the images, "
                f"got {self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        if not self.classes:
            raise VitlabError("classes is empty: give one name per class")
        if self.labels.numel() and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise VitlabError(
                f"labels must lie in [0, {len(self.classes)}) for {len(self.classes)} classes, "
                f"got range [{int(self.labels.min())}, {int(self.labels.max())}]"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


@dataclass
class DataSplits:
    """A train split and a test split sharing one class list."""

    train: ImageDataset
    test: ImageDataset

    def __post_init__(self) -> None:
        if self.train.classes != self.test.classes:
            raise VitlabError(
                f"train and test splits have different classes: {self.train.classes} vs {self.test.classes}; "
                "both splits must list the same classes in the same order"
            )


def resize_images(images: torch.Tensor, size: int, chunk: int = 1000) -> torch.Tensor:
    """uint8 images (N, C, h, w) → (N, C, size, size) uint8, bilinear (as torchvision's Resize), in chunks."""
    out = images.new_empty(len(images), images.shape[1], size, size)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].float()
        resized = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = resized.round().clamp(0, 255).to(torch.uint8)
    return out


def resize_splits(splits: DataSplits, size: int) -> DataSplits:
    """Both splits resized once at load time to `size` px (the paper's code upsampled CIFAR to 224 px)."""
    resize = lambda d: ImageDataset(resize_images(d.images, size), d.labels, d.classes)  # noqa: E731
    return DataSplits(resize(splits.train), resize(splits.test))
