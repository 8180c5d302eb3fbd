"""Batched augmentation on (N, C, H, W) tensors, reproducible through an explicit `torch.Generator`.

Crops and flips work on any dtype (uint8 is cheapest); RandAugment and Mixup/CutMix work on
float images in [0, 1]. Every random choice is drawn from the generator passed in, in a
fixed order, so the same generator state gives the same batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from vitlab.errors import VitlabError

if TYPE_CHECKING:
    from vitlab.config import AugmentConfig


def normalize(images: torch.Tensor, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5) -> torch.Tensor:
    """uint8 images, or floats in [0, 1], to float32 `(x - mean) / std` on the [0, 1] scale.

    The defaults map [0, 1] to [-1, 1], as big_vision does; mean and std may be per channel.
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean_t, std_t = (torch.as_tensor(v, dtype=torch.float32, device=x.device) for v in (mean, std))
    if mean_t.dim():
        mean_t = mean_t.view(-1, 1, 1)
    if std_t.dim():
        std_t = std_t.view(-1, 1, 1)
    return (x - mean_t) / std_t


def _coin(n: int, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device) < p


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, mode: str = "constant") -> torch.Tensor:
    """Pad each side by `padding` (zeros, or "reflect"), then cut an HxW window at a random offset per image."""
    if padding < 0 or mode not in ("constant", "reflect"):
        raise VitlabError(f"random_crop needs padding >= 0 and mode 'constant' or 'reflect', got {padding}, {mode!r}")
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode=mode)
    offset = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=gen, device=gen.device).to(x.device)
    rows = offset[0] + torch.arange(h, device=x.device)  # (n, h)
    cols = offset[1] + torch.arange(w, device=x.device)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0)) -> torch.Tensor:
    """Each float image's Inception crop (`scale` of the area, aspect 3/4 to 4/3), resized back to its size (bilinear).

    The in-memory twin of the streamed loader's crop (`vitlab.data.stream.crops.inception_box`, the same boxes),
    done for the whole batch in one `grid_sample`; no padding enters the image, as it does with `random_crop`.
    """
    from vitlab.data.stream.crops import inception_box

    n, _, h, w = x.shape
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen, device=gen.device)))
    boxes = torch.tensor([inception_box(w, h, rng, scale) for _ in range(n)], dtype=torch.float32, device=x.device)
    left, top, right, bottom = boxes.unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device)  # output [-1, 1] → the box in the input's [-1, 1]
    theta[:, 0, 0], theta[:, 0, 2] = (right - left) / w, (left + right) / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = (bottom - top) / h, (top + bottom) / h - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_flip(
    x: torch.Tensor, gen: torch.Generator, horizontal: bool = True, vertical: bool = False, p: float = 0.5
) -> torch.Tensor:
    """Mirror each image left-right and/or top-bottom, each with probability `p`."""
    for enabled, dim in ((horizontal, -1), (vertical, -2)):
        if enabled:
            x = torch.where(_coin(x.shape[0], gen, p).to(x.device)[:, None, None, None], x.flip(dim), x)
    return x


# RandAugment (Cubuk et al. 2020) operations on float images in [0, 1]. `level` is the
# magnitude divided by 10; signed operations pick a random direction per image.
_Op = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def _signed(x: torch.Tensor, gen: torch.Generator, size: float) -> torch.Tensor:
    """+size or -size per image of x, at random."""
    return torch.where(_coin(x.shape[0], gen), size, -size).to(x.device)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """other + factor * (x - other), factor per image, clipped to [0, 1] (PIL's ImageEnhance)."""
    return (other + factor.view(-1, 1, 1, 1) * (x - other)).clamp(0, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _identity(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    return x


def _brightness(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), 1 + _signed(x, gen, 0.9 * level))


def _contrast(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    return _blend(x, _grey(x).mean((2, 3), keepdim=True), 1 + _signed(x, gen, 0.9 * level))


def _color(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    return _blend(x, _grey(x), 1 + _signed(x, gen, 0.9 * level))


def _sharpness(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13  # PIL's SMOOTH filter
    c = x.shape[1]
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)
    return _blend(x, smooth, 1 + _signed(x, gen, 0.9 * level))


def _solarize(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    return torch.where(x >= 1 - level, 1 - x, x)


def _posterize(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    step = 2 ** int(4 * level)  # keeps 8 down to 4 bits
    return torch.floor(torch.round(x * 255) / step) * step / 255


def _autocontrast(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-6), x)


def _equalize(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    values = (x * 255).round().long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, values, torch.ones_like(values, dtype=torch.float))
    cdf = hist.cumsum(1)
    lowest = cdf.gather(1, values.amin(1, keepdim=True))  # count of the darkest value present
    lut = ((cdf - lowest) / (h * w - lowest).clamp_min(1)).clamp(0, 1)
    return lut.gather(1, values).view(n, c, h, w)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample x through per-image 2x3 affine maps in normalised coordinates; outside is mid-grey."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


def _matrices(x: torch.Tensor, entries: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    theta = torch.eye(2, 3, device=x.device).repeat(x.shape[0], 1, 1)
    for (row, col), value in entries.items():
        theta[:, row, col] = value
    return theta


def _rotate(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    angle = _signed(x, gen, math.radians(30) * level)
    cos, sin = angle.cos(), angle.sin()
    return _affine(x, _matrices(x, {(0, 0): cos, (0, 1): -sin, (1, 0): sin, (1, 1): cos}))


def _shear_x(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    return _affine(x, _matrices(x, {(0, 1): _signed(x, gen, 0.3 * level)}))


def _shear_y(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    return _affine(x, _matrices(x, {(1, 0): _signed(x, gen, 0.3 * level)}))


def _translate_x(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    # 0.45 of the side at full magnitude (150 px of 331, as in the RandAugment paper); x2 for [-1, 1] units
    return _affine(x, _matrices(x, {(0, 2): 2 * _signed(x, gen, 0.45 * level)}))


def _translate_y(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    return _affine(x, _matrices(x, {(1, 2): 2 * _signed(x, gen, 0.45 * level)}))


RAND_AUGMENT_OPS: dict[str, _Op] = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": _brightness,
    "contrast": _contrast,
    "color": _color,
    "sharpness": _sharpness,
    "solarize": _solarize,
    "posterize": _posterize,
    "rotate": _rotate,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}


def rand_augment(x: torch.Tensor, gen: torch.Generator, num_ops: int = 2, magnitude: float = 9) -> torch.Tensor:
    """RandAugment on float images in [0, 1]: `num_ops` ops drawn per image, strength `magnitude` of 10."""
    if not 0 <= magnitude <= 10 or num_ops < 0:
        raise VitlabError(f"rand_augment needs num_ops >= 0 and magnitude in [0, 10], got {num_ops}, {magnitude}")
    ops = list(RAND_AUGMENT_OPS.values())
    for _ in range(num_ops):
        choice = torch.randint(len(ops), (x.shape[0],), generator=gen, device=gen.device).to(x.device)
        out = x.clone()
        for k, op in enumerate(ops):
            chosen = (choice == k).nonzero()[:, 0]
            if chosen.numel():
                out[chosen] = op(x[chosen], magnitude / 10, gen)
        x = out
    return x


def mixup_cutmix(
    x: torch.Tensor,
    y_onehot: torch.Tensor,
    gen: torch.Generator,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with its mirror in the batch (x.flip(0)) by Mixup or CutMix; soft targets follow.

    One weight lam ~ Beta(alpha, alpha) per batch; CutMix is chosen with probability `switch_prob`
    when both alphas are positive. A zero alpha turns that method off.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= switch_prob <= 1:
        raise VitlabError(
            f"mixup_cutmix needs alphas >= 0 and switch_prob in [0, 1], got {mixup_alpha}, {cutmix_alpha}, {switch_prob}"
        )
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return x, y_onehot
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or bool(_coin(1, gen, switch_prob)))
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    # torch's Beta sampler takes no generator: seed a NumPy one from ours
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen, device=gen.device)))
    lam = float(rng.beta(alpha, alpha))
    partner = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
        x = x.clone()
        x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)  # the pasted area after clipping
    else:
        x = lam * x + (1 - lam) * partner
    return x, lam * y_onehot + (1 - lam) * y_onehot.flip(0)


def random_erasing(
    x: torch.Tensor,
    gen: torch.Generator,
    p: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) as in DeiT: with probability p per image, one box becomes N(0, 1) noise.

    Runs on normalised float images. The box covers `area` of the image (uniform) with a log-uniform
    aspect `ratio`; as timm, up to 10 draws per image until one fits, else that image is left as is.
    """
    if not 0 <= p <= 1 or not 0 < area[0] <= area[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise VitlabError(
            f"random_erasing needs p in [0, 1], 0 < area[0] <= area[1] <= 1 and 0 < ratio[0] <= "
            f"ratio[1], got p={p}, area={area}, ratio={ratio}"
        )
    n, _, h, w = x.shape
    tries = 10
    draw = torch.rand((3, n, tries), generator=gen, device=gen.device).to(x.device)
    target = (area[0] + (area[1] - area[0]) * draw[0]) * h * w
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draw[1])
    box_h, box_w = (target * aspect).sqrt().round(), (target / aspect).sqrt().round()
    fits = (box_h < h) & (box_w < w)
    first = torch.where(fits.any(1), fits.int().argmax(1), 0)[:, None]
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    erase = fits.any(1) & (draw[2, :, 0] < p)
    offset = torch.rand((2, n), generator=gen, device=gen.device).to(x.device)
    top, left = (offset[0] * (h - box_h + 1)).floor(), (offset[1] * (w - box_w + 1)).floor()
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (n, h)
    inside_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (n, w)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :] & erase[:, None, None])[:, None]
    noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
    return torch.where(mask, noise, x)


def fit_augment(cfg: AugmentConfig, streamed: bool) -> tuple[AugmentConfig, dict[str, str]]:
    """`cfg` with `vflip: auto` decided for in-memory or streamed data, and the start block's line on it ({} if none)."""
    if cfg.vflip != "auto":
        return cfg, {}
    if streamed:
        said = "no vertical flip (augment.vflip: auto): streamed images are cropped and flipped horizontally in the workers"
    else:
        said = "vertical flips (augment.vflip: auto): in-memory data gets the paper's flips"
    return dataclasses.replace(cfg, vflip=not streamed), {"augment": said}


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    cropped: bool = False,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch → normalised float images and targets (soft when Mixup/CutMix is on), on the batch's device.

    `cropped`: the images were cropped and flipped already (by the streaming workers).
    `crop_scale`: the area range of `augment.resized_crop` (data.crop_scale).
    """
    if cfg.crop_padding and not cropped:  # crops and flips on uint8: a quarter of the bytes of float32
        images = random_crop(images, cfg.crop_padding, gen)
    if (cfg.hflip or cfg.vflip) and not cropped:
        images = random_flip(images, gen, horizontal=cfg.hflip, vertical=cfg.vflip, p=cfg.flip_prob)
    x = images.float() / 255.0
    if cfg.resized_crop and not cropped:
        x = random_resized_crop(x, gen, crop_scale)
    if cfg.randaugment_ops:
        x = rand_augment(x, gen, num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude)
    x = normalize(x, mean, std)
    if cfg.random_erasing:
        x = random_erasing(x, gen, p=cfg.random_erasing)
    if cfg.mixup_alpha or cfg.cutmix_alpha:
        onehot = F.one_hot(labels, num_classes).float()
        return mixup_cutmix(x, onehot, gen, cfg.mixup_alpha, cfg.cutmix_alpha)
    return x, labels
