"""A procedurally generated shape-classification dataset, built in memory from a seed.

Every image shows one shape or pattern (the class) drawn at a random position, size and
rotation, in a random foreground colour on a random background colour with a linear
gradient, behind which lie distractor blobs and line segments, plus Gaussian pixel noise.
Colour never carries the class; the class is the shape. Rotation covers the full circle, so
no two classes differ only by orientation. Rendering uses signed distance functions (soft
one-pixel edges) on whole batches of images; the same seed gives bit-identical images
whatever the thread count, because only element-wise tensor operations and one seeded
`torch.Generator` are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from vitlab.data.dataset import DataSplits, ImageDataset
from vitlab.errors import VitlabError

_CHUNK = 1024  # images rendered at once: bounds the float working set (4 MB a tensor at 32 px)


@dataclass(frozen=True)
class BuiltinDifficulty:
    """Difficulty knobs of the shape dataset; sizes are fractions of the image side."""

    scale_range: tuple[float, float] = (0.22, 0.38)  # shape radius, fraction of the image side
    min_contrast: float = 0.25  # least grey-level gap between shape and background, in [0, 1)
    bright_shape_prob: float = 0.8  # chance that the shape is brighter than the background
    saturation: float = 0.35  # how far colours stray from grey, in [0, 1]
    gradient: float = 0.2  # peak-to-peak amplitude of the background's linear gradient
    num_blobs: int = 2  # distractor discs per image
    num_lines: int = 2  # distractor line segments per image
    noise_std: float = 0.05  # additive Gaussian pixel noise, on the 0..1 intensity scale

    def __post_init__(self) -> None:
        low, high = self.scale_range
        checks = [
            (0 < low <= high <= 0.5, "scale_range", "0 < low <= high <= 0.5"),
            (0 <= self.min_contrast < 1, "min_contrast", "a value in [0, 1)"),
            (0 <= self.bright_shape_prob <= 1, "bright_shape_prob", "a probability in [0, 1]"),
            (0 <= self.saturation <= 1, "saturation", "a value in [0, 1]"),
            (self.gradient >= 0, "gradient", "a value >= 0"),
            (self.num_blobs >= 0, "num_blobs", "an integer >= 0"),
            (self.num_lines >= 0, "num_lines", "an integer >= 0"),
            (self.noise_std >= 0, "noise_std", "a value >= 0"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise VitlabError(f"builtin dataset: {name}={getattr(self, name)!r} is invalid; use {allowed}")


# Signed distance functions of the shapes, in units of the shape radius: negative inside.
# (u, v) are pixel coordinates relative to the shape centre, rotated, divided by the radius.
def _disc(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.hypot(u, v) - 0.9


def _ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (torch.hypot(u, v) - 0.8).abs() - 0.2


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) - 0.75


def _frame(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (torch.maximum(u.abs(), v.abs()) - 0.65).abs() - 0.15


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Equilateral, circumradius 1.1: the largest of three half-plane distances.
    sides = [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    return torch.maximum(torch.maximum(sides[0], sides[1]), sides[2]) - 0.55


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    au, av = u.abs(), v.abs()
    return torch.minimum(torch.maximum(au - 0.95, av - 0.28), torch.maximum(au - 0.28, av - 0.95))


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.hypot(u, v) - (0.55 + 0.4 * torch.cos(5 * torch.atan2(v, u)))


def _stripes(u: torch.Tensor, v: torch.Tensor, period: float = 0.55) -> torch.Tensor:
    phase = torch.frac(u / period + 100.0)  # +100 keeps frac's argument positive
    stripe = ((phase - 0.5).abs() - 0.25) * period
    return torch.maximum(stripe, torch.hypot(u, v) - 0.95)


def _to_nearest_integer(x: torch.Tensor) -> torch.Tensor:
    f = torch.frac(x)
    return torch.minimum(f, 1 - f)


def _checker(u: torch.Tensor, v: torch.Tensor, period: float = 0.55) -> torch.Tensor:
    cu, cv = u / period + 100.0, v / period + 100.0
    edge = torch.minimum(_to_nearest_integer(cu), _to_nearest_integer(cv)) * period
    parity = (torch.floor(cu) + torch.floor(cv)) % 2  # 0 on the drawn cells
    cells = torch.where(parity == 0, -edge, edge)
    return torch.maximum(cells, torch.maximum(u.abs(), v.abs()) - 0.8)


def _crescent(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.hypot(u, v) - 1.0, 0.8 - torch.hypot(u - 0.5, v))


_Shape = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_SHAPES: dict[str, _Shape] = {
    "disc": _disc,
    "ring": _ring,
    "square": _square,
    "frame": _frame,
    "triangle": _triangle,
    "cross": _cross,
    "star": _star,
    "stripes": _stripes,
    "checker": _checker,
    "crescent": _crescent,
}
BUILTIN_CLASSES: list[str] = list(_SHAPES)


def _uniform(gen: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=gen)


def _colours(grey: torch.Tensor, saturation: float, gen: torch.Generator) -> torch.Tensor:
    """RGB colours (..., 3) around the given grey levels (...), with a random zero-mean hue offset."""
    hue = _uniform(gen, -1.0, 1.0, *grey.shape, 3)
    hue = hue - hue.mean(-1, keepdim=True)
    return (grey.unsqueeze(-1) + saturation * hue).clamp(0, 1)


def _draw_parameters(n: int, size: int, knobs: BuiltinDifficulty, gen: torch.Generator) -> dict:
    """All random choices of n images, in pixel units, drawn in one fixed order."""
    nb, nl = knobs.num_blobs, knobs.num_lines
    radius = size * _uniform(gen, *knobs.scale_range, n)
    centre = radius[:, None] + (size - 2 * radius[:, None]) * torch.rand(n, 2, generator=gen)
    gap = _uniform(gen, knobs.min_contrast, 1, n)
    dark = (1 - gap) * torch.rand(n, generator=gen)
    bright = torch.rand(n, generator=gen) < knobs.bright_shape_prob
    fg_grey, bg_grey = torch.where(bright, dark + gap, dark), torch.where(bright, dark, dark + gap)
    line_angle = _uniform(gen, 0, 2 * math.pi, n, nl)
    return {
        "radius": radius,
        "centre": centre,
        "angle": _uniform(gen, 0, 2 * math.pi, n),
        "bg": _colours(bg_grey, knobs.saturation, gen),
        "fg": _colours(fg_grey, knobs.saturation, gen),
        "slope": knobs.gradient * _uniform(gen, -1, 1, n, 2),
        "blob_centre": size * torch.rand(n, nb, 2, generator=gen),
        "blob_radius": size * _uniform(gen, 0.03, 0.08, n, nb),
        "blob_colour": _colours(torch.rand(n, nb, generator=gen), knobs.saturation, gen),
        "line_start": size * torch.rand(n, nl, 2, generator=gen),
        "line_dir": torch.stack([line_angle.cos(), line_angle.sin()], -1),
        "line_length": size * _uniform(gen, 0.2, 0.45, n, nl),
        "line_colour": _colours(torch.rand(n, nl, generator=gen), knobs.saturation, gen),
    }


def _coverage(distance: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance in pixels."""
    return (0.5 - distance).clamp_(0, 1)


def _render(p: dict, shape: _Shape, size: int, noise_std: float, gen: torch.Generator) -> torch.Tensor:
    """Render images of one shape described by parameters p as uint8 (n, 3, size, size)."""
    # Coordinates stay separable, (n, 1, size) and (n, size, 1), until a formula mixes x and y.
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = coords[None, :, None], coords[None, None, :]
    ramp = coords / size - 0.5
    slope = p["slope"][:, :, None, None]
    canvas = (slope[:, 0] * ramp[None, None, :] + slope[:, 1] * ramp[None, :, None])[:, None]
    canvas = canvas + p["bg"][:, :, None, None]

    for j in range(p["line_start"].shape[1]):
        px, py = x - p["line_start"][:, j, 0, None, None], y - p["line_start"][:, j, 1, None, None]
        ex, ey = p["line_dir"][:, j, 0, None, None], p["line_dir"][:, j, 1, None, None]
        half = p["line_length"][:, j, None, None] / 2
        along = ((px * ex + py * ey - half).abs_() - half).clamp_(min=0)
        across = (px * ey - py * ex).abs_()
        dist = torch.hypot(along, across) - 0.6 * size / 32  # lines about 1.2 px wide at 32 px
        canvas.lerp_(p["line_colour"][:, j, :, None, None], _coverage(dist)[:, None])
    for j in range(p["blob_centre"].shape[1]):
        centre = p["blob_centre"][:, j, :, None, None]
        dist = torch.hypot(x - centre[:, 0], y - centre[:, 1]) - p["blob_radius"][:, j, None, None]
        canvas.lerp_(p["blob_colour"][:, j, :, None, None], _coverage(dist)[:, None])

    r = p["radius"][:, None, None]
    cos, sin = p["angle"].cos()[:, None, None] / r, p["angle"].sin()[:, None, None] / r
    dx, dy = x - p["centre"][:, 0, None, None], y - p["centre"][:, 1, None, None]
    dist = shape(cos * dx + sin * dy, cos * dy - sin * dx).mul_(r)
    canvas.lerp_(p["fg"][:, :, None, None], _coverage(dist)[:, None])

    if noise_std > 0:
        canvas.add_(torch.randn(canvas.shape, generator=gen), alpha=noise_std)
    return canvas.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def make_builtin(
    num_images: int, seed: int = 0, image_size: int = 32, difficulty: BuiltinDifficulty | None = None
) -> ImageDataset:
    """Generate `num_images` shape images with balanced labels, bit-identical for a given seed."""
    if num_images < 1 or image_size < 8:
        raise VitlabError(f"builtin dataset needs num_images >= 1 and image_size >= 8, got {num_images} and {image_size}")
    knobs = difficulty or BuiltinDifficulty()
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(num_images) % len(_SHAPES))[torch.randperm(num_images, generator=gen)]
    params = _draw_parameters(num_images, image_size, knobs, gen)
    images = torch.empty(num_images, 3, image_size, image_size, dtype=torch.uint8)
    for k, shape in enumerate(_SHAPES.values()):
        for index in (labels == k).nonzero()[:, 0].split(_CHUNK):
            chunk = {key: value[index] for key, value in params.items()}
            images[index] = _render(chunk, shape, image_size, knobs.noise_std, gen)
    return ImageDataset(images=images, labels=labels, classes=list(BUILTIN_CLASSES))


def difficulty_knobs(knobs: dict, section: str = "data") -> BuiltinDifficulty:
    """`section.builtin` of a config as BuiltinDifficulty; an unknown key fails in one line naming the allowed ones."""
    allowed = [f.name for f in fields(BuiltinDifficulty)]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        sizes = (
            f"; sizes and the seed are {section}.num_train, {section}.num_test, {section}.seed"
            if set(unknown) & {"num_train", "num_test", "seed", "image_size"}
            else ""
        )
        raise VitlabError(f"{section}.builtin: unknown key(s) {unknown}; it takes the difficulty knobs {allowed}{sizes}")
    return BuiltinDifficulty(**knobs)


def builtin_splits(
    num_train: int = 20000, num_test: int = 2000, seed: int = 0, image_size: int = 32, **difficulty: object
) -> DataSplits:
    """Train and test splits of the shape dataset; `difficulty` takes the fields of BuiltinDifficulty."""
    knobs = difficulty_knobs(difficulty)
    train_seed, test_seed = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    return DataSplits(
        train=make_builtin(num_train, train_seed, image_size, knobs),
        test=make_builtin(num_test, test_seed, image_size, knobs),
    )
