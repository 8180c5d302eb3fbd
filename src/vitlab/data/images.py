"""Reading image files: decode with Pillow, 8-bit RGB, resize, within a pixel cap and inside the folder given.

The one reader behind image-folder datasets, CycleGAN folders, `vitlab inspect --image`, `vitlab predict`
and `vitlab translate`. 16-bit greyscale PNGs are scaled to 8 bits; images over `max_pixels` (a
decompression-bomb guard) and links leading outside the folder are unusable, each with a message
naming the file; decoding runs on torch's thread count, which `train.threads` sets.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitlab.errors import VitlabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 64_000_000  # per image, 8K × 8K; Pillow itself only warns below 179 MP (537 MB decoded as RGB)


class UnusableImage(VitlabError):
    """An image file that cannot be used; the message names the file and why."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greyscale (mode I;16, or I in older Pillow) is scaled by its bit depth, not clipped."""
    if image.mode.startswith("I"):
        image = Image.fromarray((np.asarray(image).clip(0, 65535).astype(np.uint16) >> 8).astype(np.uint8), "L")
    return image.convert("RGB")


def decode_image(path: Path, image_size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image as (image_size, image_size, 3) uint8; raises UnusableImage when it cannot be used."""
    try:
        with Image.open(path) as image:
            size = image.size
            rgb = _to_rgb(image) if size[0] * size[1] <= max_pixels else None  # decodes fully: truncation fails here
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnusableImage(f"{path} (unreadable)") from exc
    if rgb is None:
        raise UnusableImage(f"{path} ({size[0]}x{size[1]} pixels, over the cap of {max_pixels}; downscale it)")
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def _attempt(path: Path, image_size: int, max_pixels: int) -> np.ndarray | UnusableImage:
    try:
        return decode_image(path, image_size, max_pixels)
    except UnusableImage as exc:
        return exc


def decode_images(files: list[Path], image_size: int, max_pixels: int = MAX_PIXELS) -> list[np.ndarray | UnusableImage]:
    """Decode files in parallel on torch's thread count; each entry is the image or why it is unusable."""
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:  # Pillow decodes without the GIL
        return list(pool.map(lambda path: _attempt(path, image_size, max_pixels), files))


def listed_images(folder: Path, root: Path) -> tuple[list[Path], list[str]]:
    """The image files of `folder`, sorted, and a skip note for each that is a link leading outside `root`."""
    inside, outside = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            (inside if path.resolve().is_relative_to(root.resolve()) else outside).append(path)
    return inside, [f"{path} (a link to {path.resolve()}, outside {root}; copy the file in)" for path in outside]


def refuse(unusable: list[str]) -> None:
    """Raise a VitlabError naming the first few unusable files, if any."""
    if unusable:
        shown = ", ".join(unusable[:5]) + (", ..." if len(unusable) > 5 else "")
        raise VitlabError(f"cannot read {len(unusable)} image(s): {shown}")


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
