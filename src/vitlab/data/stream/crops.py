"""Per-image decoding in DataLoader workers: Inception crop or centre crop, to a uint8 (3, S, S) tensor.

The crop box is chosen from the image header before any pixel is decoded, so a JPEG can be
decoded at 1/2, 1/4 or 1/8 size (`Image.draft`) whenever the box still holds at least `size`
pixels per side at that scale. The box is then resampled with torch's uint8 antialiased
bilinear kernel, several times faster than Pillow's `resize` on a 500x375 photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitlab.data.images import MAX_PIXELS, open_image, to_rgb
from vitlab.errors import VitlabError

Box = tuple[int, int, int, int]  # left, top, right, bottom, in pixels


def inception_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """A random box of `scale` of the area and log-uniform aspect `ratio` (Szegedy et al. 2015).

    As torchvision's RandomResizedCrop: up to 10 tries, then the centre crop clipped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def centre_box(width: int, height: int, crop_fraction: float) -> Box:
    """The centre square that resizing the shorter side to S / crop_fraction and cutting out S x S keeps."""
    side = max(1, round(min(width, height) * crop_fraction))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _draft(image: Image.Image, box: Box, size: int) -> Box:
    """Ask a JPEG for the smallest DCT-scaled decode that keeps >= `size` pixels across the box; the box there."""
    left, top, right, bottom = box
    width, height = image.size
    # draft picks the scale s = min(W // w, H // h) rounded down to 8, 4, 2 or 1: W / s >= w, so the
    # box, (right - left) / s wide, keeps >= size pixels
    request = (math.ceil(width * size / (right - left)), math.ceil(height * size / (bottom - top)))
    drafted = image.draft("RGB", (min(request[0], width), min(request[1], height)))
    scale = 1 if drafted is None else round(width / drafted[1][2])
    if scale == 1:
        return box
    w, h = image.size
    left, top = min(round(left / scale), w - 1), min(round(top / scale), h - 1)
    return left, top, max(min(round(right / scale), w), left + 1), max(min(round(bottom / scale), h), top + 1)


@dataclass(frozen=True)
class CropDecoder:
    """Decode one encoded image to uint8 (3, size, size): Inception crop + flip (train) or centre crop (eval).

    Opened and converted as every other reader does (images.open_image, images.to_rgb): an image over
    `max_pixels` raises UnusableImage before decoding, 16-bit greyscale is scaled to 8 bits.
    """

    size: int = 224
    train: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5  # train: the chance of a horizontal flip (augment.flip_prob, 0 when augment.hflip is off)
    crop_fraction: float = 0.875
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 < self.crop_fraction <= 1:
            raise VitlabError(f"crop needs size >= 1 and crop_fraction in (0, 1], got {self.size}, {self.crop_fraction}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise VitlabError(
                f"crop needs 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                f"got scale={self.scale}, ratio={self.ratio}"
            )

    def __call__(self, source: str | Path | BinaryIO, rng: np.random.Generator | None = None) -> torch.Tensor:
        """The crop of the image at `source` (a path or a file object); `rng` draws the train crop and flip."""
        if self.train and rng is None:
            raise VitlabError("a train CropDecoder needs an rng")
        with open_image(source, self.max_pixels) as image:
            if self.train:
                box = inception_box(*image.size, rng, self.scale, self.ratio)
            else:
                box = centre_box(*image.size, self.crop_fraction)
            if image.format == "JPEG":
                box = _draft(image, box, self.size)
            pixels = np.array(to_rgb(image.crop(box)))  # decodes (a truncated file raises OSError here), copies the box
        region = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        if region.shape[-2:] != (self.size, self.size):
            region = F.interpolate(
                region.contiguous(memory_format=torch.channels_last), size=(self.size, self.size), mode="bilinear", antialias=True
            )
        out = region[0]
        if self.train and self.flip_prob and rng.random() < self.flip_prob:
            out = out.flip(-1)
        return out.contiguous()
