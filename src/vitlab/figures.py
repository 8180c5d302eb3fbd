"""Every figure vitlab draws goes through here: matplotlib Figures made without pyplot (no backend, no global state), saved as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter
from PIL import Image, ImageDraw


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure of `width` × `height` inches, independent of pyplot and its backend."""
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, path: str | Path, grid_axes=()) -> Path:
    """Write `fig` as a PNG (creating the folder), with a light grid on `grid_axes`, and return the path."""
    for ax in grid_axes:
        ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_curve(ax: Axes, x, y, **style) -> None:
    """`ax.plot` of a logged series, with a marker when it has a single point (a line through one point draws nothing)."""
    ax.plot(x, y, **({"marker": "o"} if len(x) == 1 else {}), **style)


def log_y(ax: Axes) -> None:
    """A log-scale y axis for what is plotted; within a decade its ticks read as plain numbers (2.2, not 2.2×10⁰)."""
    ax.set_yscale("log")
    low, high = ax.dataLim.intervaly
    if 0 < low <= high < 10 * low:
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:.3g}"))
        ax.yaxis.set_minor_formatter(StrMethodFormatter("{x:.3g}"))


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map (the last two axes) to [0, 1]; a constant map becomes 0."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - low
    return (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny)


def image_array(image: torch.Tensor) -> np.ndarray:
    """A (C, H, W) uint8 image as an (H, W, C) array for `imshow` (grey for one channel)."""
    array = image.permute(1, 2, 0).cpu().numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def save_image_grid(path: Path, columns: dict[str, torch.Tensor], min_side: int = 128) -> Path:
    """Write uint8 image sets (K, 3, H, W) side by side as titled columns, one image per row (Fig. 4's layout).

    Small images are enlarged by pixel repetition to at least `min_side` pixels.
    """
    images = torch.stack(list(columns.values()), dim=1).cpu()  # (K, columns, 3, H, W)
    rows, cols, _, h, w = images.shape
    scale = max(1, -(-min_side // max(h, w)))
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    pad, header = 4, 18
    h, w = h * scale, w * scale
    canvas = Image.new("RGB", (cols * (w + pad) + pad, header + rows * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(columns):
        draw.text((pad + col * (w + pad) + w // 2, header // 2), title, fill="black", anchor="mm")
        for row in range(rows):
            tile = Image.fromarray(images[row, col].permute(1, 2, 0).numpy())
            canvas.paste(tile, (pad + col * (w + pad), header + row * (h + pad)))
    canvas.save(path)
    return path
