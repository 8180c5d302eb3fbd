"""Batched augmentation on float image tensors in [0, 1], without torchvision.

Every random choice comes from an explicit `torch.Generator`, so a training loop that seeds
it from (seed, step) reproduces each batch exactly, also after a resume.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Map [0, 1] images to the model's input range ([-1, 1] by default, as big_vision does)."""
    return (x - mean) / std


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` pixels, then crop back to the input size at a random offset per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor, gen: torch.Generator, horizontal: bool = True, vertical: bool = False) -> torch.Tensor:
    """Flip each image left-right and/or up-down with probability 1/2 each."""
    for enabled, dim in ((horizontal, -1), (vertical, -2)):
        if enabled:
            flip = (torch.rand(x.shape[0], generator=gen) < 0.5)[:, None, None, None]
            x = torch.where(flip, x.flip(dim), x)
    return x


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of RGB images, kept as one channel."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


def blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """b + factor·(a − b), clipped to [0, 1]; factor per image."""
    return (b + factor[:, None, None, None] * (a - b)).clamp(0, 1)


def affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply per-image 2×3 affine maps (normalised coordinates), filling with mid-grey."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


def identity_theta(n: int) -> torch.Tensor:
    return torch.eye(2, 3).repeat(n, 1, 1)


def _rotate(x, s, m):
    angle = s * math.radians(30.0) * m
    theta = identity_theta(len(x))
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    return affine(x, theta)


def _shear(axis: int):
    def op(x, s, m):
        theta = identity_theta(len(x))
        theta[:, axis, 1 - axis] = s * 0.3 * m
        return affine(x, theta)

    return op


def _translate(axis: int):
    def op(x, s, m):
        theta = identity_theta(len(x))
        theta[:, axis, 2] = s * 0.45 * 2 * m  # up to 45 % of the side (normalised coordinates span 2)
        return affine(x, theta)

    return op


def _posterize(x, s, m):
    bits = 8 - int(round(4 * float(m)))  # 8 bits at magnitude 0 down to 4
    levels = 2**bits
    return torch.floor(x * 255 / (256 // levels)) * (256 // levels) / 255


def _autocontrast(x, s, m):
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-6), x)


# RandAugment ops (Cubuk et al. 2020) on [0, 1] tensors: op(x, sign per image, magnitude in [0, 1]).
# Ranges follow the paper's (rotate 30°, shear 0.3, translate 0.45, enhance factors 1 ± 0.9).
RAND_AUGMENT_OPS = {
    "identity": lambda x, s, m: x,
    "autocontrast": _autocontrast,
    "brightness": lambda x, s, m: blend(x, torch.zeros_like(x), 1 + s * 0.9 * m),
    "contrast": lambda x, s, m: blend(x, grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), 1 + s * 0.9 * m),
    "color": lambda x, s, m: blend(x, grey(x).expand_as(x), 1 + s * 0.9 * m),
    "solarize": lambda x, s, m: torch.where(x >= 1 - m, 1 - x, x),
    "posterize": _posterize,
    "rotate": _rotate,
    "shear_x": _shear(0),
    "shear_y": _shear(1),
    "translate_x": _translate(0),
    "translate_y": _translate(1),
}


def rand_augment(x: torch.Tensor, gen: torch.Generator, num_ops: int = 2, magnitude: float = 9) -> torch.Tensor:
    """RandAugment: `num_ops` rounds, each applying one uniformly chosen op per image at `magnitude`/10."""
    ops = list(RAND_AUGMENT_OPS.values())
    m = torch.tensor(magnitude / 10.0)
    for _ in range(num_ops):
        choice = torch.randint(0, len(ops), (x.shape[0],), generator=gen)
        sign = torch.where(torch.rand(x.shape[0], generator=gen) < 0.5, -1.0, 1.0)
        out = x.clone()
        for k, op in enumerate(ops):
            chosen = choice == k
            if chosen.any():
                out[chosen] = op(x[chosen], sign[chosen], m).clamp(0, 1)
        x = out
    return x


def mixup_cutmix(
    x: torch.Tensor, targets: torch.Tensor, gen: torch.Generator, mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0, switch_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Mix each image with its mirror in the batch (Mixup, Zhang et al. 2018, or CutMix, Yun et al. 2019).

    One mixing weight per batch; with both enabled, CutMix is chosen with probability `switch_prob`.
    `targets` are one-hot (or already soft); the returned targets are mixed by the same weight,
    for CutMix the exact pasted area fraction.
    """
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    partner, partner_targets = x.flip(0), targets.flip(0)
    if use_cutmix:
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = rng.integers(h), rng.integers(w)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2 + cut_h % 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2 + cut_w % 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        lam = rng.beta(mixup_alpha, mixup_alpha)
        x = lam * x + (1 - lam) * partner
    return x, lam * targets + (1 - lam) * partner_targets
