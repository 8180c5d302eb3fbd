"""Reading image files: decode with Pillow, 8-bit RGB, resize, within a pixel cap and inside the folder given.

The one reader behind image-folder datasets, Hugging Face datasets (encoded bytes), CycleGAN folders,
`vitlab inspect --image`, `vitlab predict` and `vitlab translate`; the streamed crop decoder (folders,
shards, Hugging Face datasets) opens and converts through the same `open_image` and `to_rgb`. 16-bit
greyscale PNGs are scaled to 8 bits; images over `max_pixels` (a decompression-bomb guard) and links
leading outside the folder are unusable, each with a message naming the file; decoding runs on torch's
thread count, which `train.threads` sets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from vitlab.errors import VitlabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 64_000_000  # per image, 8K × 8K; Pillow itself only warns below 179 MP (537 MB decoded as RGB)
DECODE_ERRORS = (OSError, ValueError, SyntaxError)  # what Pillow raises on a file it cannot decode (UnusableImage included)


class UnusableImage(VitlabError):
    """An image file that cannot be used; the message says why (and names the file where the reader knows it)."""


@contextmanager
def open_image(source: str | Path | BinaryIO, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """`source` opened by Pillow, header only; an image over `max_pixels` raises UnusableImage before a pixel is decoded."""
    try:
        image = Image.open(source)
    except Image.DecompressionBombError:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS, fires before ours
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise UnusableImage(f"more than {limit} pixels, over the cap of {max_pixels}; downscale it") from None
    with image:
        if image.width * image.height > max_pixels:
            raise UnusableImage(f"{image.width}x{image.height} pixels, over the cap of {max_pixels}; downscale it")
        yield image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greyscale (mode I;16, or I in older Pillow) is scaled by its bit depth, not clipped."""
    if image.mode.startswith("I"):
        image = Image.fromarray((np.asarray(image).clip(0, 65535).astype(np.uint16) >> 8).astype(np.uint8), "L")
    return image.convert("RGB")


def decode_image(source: Path | BinaryIO, image_size: int, max_pixels: int = MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """The image as (image_size, image_size, 3) uint8; raises UnusableImage naming `name` (else the path) if unusable."""
    name = name or str(source)
    try:
        with open_image(source, max_pixels) as image:
            rgb = to_rgb(image)  # decodes fully: truncation fails here
    except UnusableImage as exc:
        raise UnusableImage(f"{name} ({exc})") from None
    except DECODE_ERRORS as exc:
        raise UnusableImage(f"{name} (unreadable)") from exc
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def _attempt(item, image_size: int, max_pixels: int, opener: Callable) -> np.ndarray | UnusableImage:
    try:
        source, name = opener(item)
        return decode_image(source, image_size, max_pixels, name)
    except UnusableImage as exc:
        return exc


def _as_path(item: Path) -> tuple[Path, str]:
    return item, str(item)


def decode_images(
    items: Sequence, image_size: int, max_pixels: int = MAX_PIXELS, opener: Callable = _as_path
) -> list[np.ndarray | UnusableImage]:
    """Decode items in parallel on torch's thread count; each entry is the image or why it is unusable.

    Items are paths, or anything `opener` turns into (a path or file object, its name); an opener may raise UnusableImage.
    """
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:  # Pillow decodes without the GIL
        return list(pool.map(lambda item: _attempt(item, image_size, max_pixels, opener), items))


def outside_note(path: Path, root: Path) -> str | None:
    """A note naming `path` when it resolves outside `root` (a link leading out of it), else None."""
    real = path.resolve()
    return None if real.is_relative_to(root.resolve()) else f"{path} (a link to {real}, outside {root}; copy the file in)"


def listed_images(folder: Path, root: Path) -> tuple[list[Path], list[str]]:
    """The image files of `folder`, sorted, and a skip note for each that is a link leading outside `root`.

    The one rule for every reader of image folders, in memory or streamed, and for `vitlab shard`.
    Only links (and the files of a folder that resolves elsewhere) are resolved: a scan of a million files stays fast.
    """
    inside, notes = [], []
    folder_inside = outside_note(folder, root) is None
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                path = folder / entry.name
                note = outside_note(path, root) if entry.is_symlink() or not folder_inside else None
                if note:
                    notes.append(note)
                else:
                    inside.append(path)
    return inside, notes


def named(notes: list[str], shown: int = 5) -> str:
    """The first `shown` notes, joined for a one-line message."""
    return ", ".join(notes[:shown]) + (", ..." if len(notes) > shown else "")


def refuse(unusable: list[str]) -> None:
    """Raise a VitlabError naming the first few unusable files, if any."""
    if unusable:
        raise VitlabError(f"cannot read {len(unusable)} image(s): {named(unusable)}")


def image_files(inputs: list[str | Path] | str | Path) -> list[Path]:
    """Image files named directly, or found in named folders (sorted, not recursive); a link leading out of its folder is an error."""
    files: list[Path] = []
    for item in map(Path, [inputs] if isinstance(inputs, (str, Path)) else inputs):
        if item.is_dir():
            found, outside = listed_images(item, item)
            refuse(outside)
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise VitlabError(f"{item} is neither an image file nor a folder")
    return files


def read_images(files: list[Path], image_size: int) -> torch.Tensor:
    """Decode image files, resized to a square `image_size`, as uint8 (N, 3, H, W); an unusable one is an error."""
    decoded = decode_images([Path(f) for f in files], image_size)
    refuse([str(array) for array in decoded if isinstance(array, UnusableImage)])
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
