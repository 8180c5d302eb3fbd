"""Batched augmentation: reproducibility, shapes, and that each transform does what it says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab.config import AugmentConfig
from vitlab.data.augment import (
    RAND_AUGMENT_OPS,
    fit_augment,
    mixup_cutmix,
    normalize,
    rand_augment,
    random_crop,
    random_flip,
    random_resized_crop,
)
from vitlab.errors import VitlabError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 16, size: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=_gen(123), dtype=torch.uint8)


def _pipeline(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = random_flip(random_crop(x, 4, gen), gen, vertical=True)
    x = rand_augment(x.float() / 255, gen, num_ops=3, magnitude=9)
    return mixup_cutmix(x, F.one_hot(torch.arange(len(x)) % 10, 10).float(), gen, 0.8, 1.0)


def test_same_generator_state_gives_the_same_batch() -> None:
    x = _batch()
    first, second, other = _pipeline(x, _gen(1)), _pipeline(x, _gen(1)), _pipeline(x, _gen(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_shapes_and_dtypes_are_kept() -> None:
    x = _batch()
    for images in (x, x.float() / 255):
        assert random_crop(images, 3, _gen(), mode="reflect").dtype == images.dtype
        assert random_crop(images, 3, _gen()).shape == images.shape
        assert random_flip(images, _gen(), vertical=True).dtype == images.dtype
    out = rand_augment(x.float() / 255, _gen(), num_ops=2, magnitude=10)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def _find_offset(padded: torch.Tensor, window: torch.Tensor) -> list[tuple[int, int]]:
    h, w = window.shape[-2:]
    dy_max, dx_max = padded.shape[-2] - h, padded.shape[-1] - w
    return [
        (dy, dx)
        for dy in range(dy_max + 1)
        for dx in range(dx_max + 1)
        if torch.equal(padded[..., dy : dy + h, dx : dx + w], window)
    ]


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_crop_is_a_window_of_the_padded_image_at_varied_offsets(mode: str) -> None:
    x = _batch(n=64)
    out = random_crop(x, 2, _gen(), mode=mode)
    padded = F.pad(x, (2, 2, 2, 2), mode=mode)
    offsets = [_find_offset(padded[i], out[i]) for i in range(len(x))]
    assert all(len(found) == 1 for found in offsets)
    used = {found[0] for found in offsets}
    assert {dy for dy, _ in used} == {0, 1, 2, 3, 4} and {dx for _, dx in used} == {0, 1, 2, 3, 4}


def test_crop_moves_a_marked_pixel_by_the_offset() -> None:
    x = torch.zeros(32, 1, 8, 8)
    x[:, 0, 3, 5] = 1.0
    out = random_crop(x, 3, _gen(7))
    for image in out[:, 0]:
        if image.sum() == 0:  # the mark was cut off, which needs a shift of 4 or more
            continue
        ((row, col),) = image.nonzero().tolist()
        dy, dx = 3 - (row - 3), 3 - (col - 5)  # output (r, c) shows padded (r + dy, c + dx) = input (r + dy - 3, …)
        assert 0 <= dy <= 6 and 0 <= dx <= 6
        expected = torch.zeros(8, 8)
        expected[3 + 3 - dy, 5 + 3 - dx] = 1.0
        assert torch.equal(image, expected)
    assert (out[:, 0].sum((1, 2)) == 0).any(), "some offsets must push the mark outside"


def test_flips_equal_torch_flip_and_both_outcomes_occur() -> None:
    x = _batch(n=64)
    horizontal = random_flip(x, _gen(), horizontal=True)
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(horizontal, x)]
    kept = [torch.equal(a, b) for a, b in zip(horizontal, x)]
    assert all(f != k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)

    both = random_flip(x, _gen(), horizontal=True, vertical=True)
    variants = [(x[i], x[i].flip(-1), x[i].flip(-2), x[i].flip(-1, -2)) for i in range(len(x))]
    outcome = [[torch.equal(both[i], v) for v in variants[i]].index(True) for i in range(len(x))]
    assert set(outcome) == {0, 1, 2, 3}


def _indexed_batch(n: int = 8, size: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i filled with the value i; one-hot targets of class i."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return x, torch.eye(n)


def test_mixup_targets_sum_to_one_and_match_the_pixel_weight() -> None:
    x, y = _indexed_batch()
    out, targets = mixup_cutmix(x, y, _gen(3), mixup_alpha=0.8, cutmix_alpha=0.0)
    assert torch.allclose(targets.sum(1), torch.ones(len(x)))
    lam = targets[0, 0].item()
    assert 0 < lam < 1
    partner = torch.arange(len(x)).flip(0).float()
    assert torch.allclose(out[:, 0, 0, 0], lam * torch.arange(len(x)).float() + (1 - lam) * partner)
    assert torch.allclose(targets.diagonal(), torch.full((len(x),), lam))


def test_cutmix_label_weight_equals_the_kept_area() -> None:
    x, y = _indexed_batch()
    for seed in range(5):
        out, targets = mixup_cutmix(x, y, _gen(seed), mixup_alpha=0.0, cutmix_alpha=1.0)
        assert torch.allclose(targets.sum(1), torch.ones(len(x)))
        kept = (out == x).float().mean((1, 2, 3))
        assert torch.allclose(targets.diagonal(), kept)
        assert set(out.unique().tolist()) <= set(range(len(x)))


def test_mixing_is_off_when_both_alphas_are_zero_and_rejects_bad_values() -> None:
    x, y = _indexed_batch()
    out, targets = mixup_cutmix(x, y, _gen(), 0.0, 0.0)
    assert out is x and targets is y
    with pytest.raises(VitlabError, match="alphas >= 0"):
        mixup_cutmix(x, y, _gen(), -1.0, 0.0)


@pytest.mark.parametrize("name", sorted(RAND_AUGMENT_OPS))
def test_each_rand_augment_op_keeps_range_and_shape(name: str) -> None:
    x = _batch(n=8).float() / 255
    out = RAND_AUGMENT_OPS[name](x, 0.9, _gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    if name != "identity":
        assert not torch.equal(out, x)


def test_posterize_at_zero_and_affine_ops_at_zero_are_exact_identities() -> None:
    x = _batch(n=4).float() / 255
    for name in ("posterize", "rotate", "shear_x", "translate_y", "brightness"):
        assert torch.allclose(RAND_AUGMENT_OPS[name](x, 0.0, _gen()), x, atol=1e-6), name


def test_equalize_spreads_a_low_contrast_image() -> None:
    x = (torch.arange(100).float().view(1, 1, 10, 10) % 20 + 100) / 255
    out = RAND_AUGMENT_OPS["equalize"](x.expand(1, 3, 10, 10), 1.0, _gen())
    assert out.min() == 0 and out.max() == 1


def test_normalize_accepts_uint8_or_unit_floats_and_per_channel_stats() -> None:
    x = _batch(n=2)
    assert torch.allclose(normalize(x), x.float() / 255 * 2 - 1)
    assert torch.allclose(normalize(x), normalize(x.float() / 255))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 1.0)
    out = normalize(x, mean, std)
    assert torch.allclose(out[:, 1], (x[:, 1].float() / 255 - 0.2) / 0.25)
    assert out.dtype == torch.float32


def test_random_erasing_puts_noise_boxes_of_the_right_size_in_about_p_of_the_images() -> None:
    from vitlab.data.augment import random_erasing

    x = torch.full((2000, 3, 32, 32), 7.0)
    out = random_erasing(x, _gen(3), p=0.25)
    erased = (out != 7.0).flatten(1)
    hit = erased.any(1)
    assert 0.21 < hit.float().mean() < 0.29
    fraction = erased[hit].float().mean(1)  # every channel of the box is noise
    assert fraction.min() >= 0.02 * 0.8 and fraction.max() <= 1 / 3 * 1.2
    rows, cols = (out[hit] != 7.0).any(1).any(2), (out[hit] != 7.0).any(1).any(1)
    area = rows.sum(1) * cols.sum(1)
    assert torch.equal(area, (out[hit] != 7.0).any(1).flatten(1).sum(1))  # one rectangle per image
    noise = out[hit][out[hit] != 7.0]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    assert torch.equal(out, random_erasing(x, _gen(3), p=0.25))
    assert torch.equal(random_erasing(x, _gen(3), p=0.0), x)
    with pytest.raises(VitlabError):
        random_erasing(x, _gen(), p=1.5)


def test_flip_probability_sets_the_share_of_mirrored_images() -> None:
    x = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(1, 3, 4, 4).repeat(3000, 1, 1, 1)
    for p in (0.0, 0.33, 1.0):
        flipped = (random_flip(x, _gen(), p=p) != x).flatten(1).any(1).float().mean().item()
        assert abs(flipped - p) < 0.03


def test_random_resized_crop_resamples_one_box_per_image_without_padding() -> None:
    x = torch.rand(8, 3, 16, 16, generator=_gen(1))
    assert torch.allclose(random_resized_crop(x, _gen(), scale=(1.0, 1.0)), x, atol=1e-6)  # the whole image: unchanged

    ramp = torch.arange(32.0).expand(64, 3, 32, 32)  # pixel value = column
    out = random_resized_crop(ramp, _gen(), scale=(0.2, 0.5))
    assert torch.equal(out, random_resized_crop(ramp, _gen(), scale=(0.2, 0.5)))  # same generator, same crops
    slope = out[:, 0, 0, 2] - out[:, 0, 0, 1]  # a crop of w columns resized to 32: w / 32 columns per pixel
    assert slope.min() > 0 and slope.max() <= (0.5 * 4 / 3) ** 0.5 + 1e-4 and slope.std() > 0.02
    steps = out[..., 2:-1] - out[..., 1:-2]  # linear inside the box: no padding (the edge pixels may clamp)
    assert torch.allclose(steps, slope.view(-1, 1, 1, 1).expand_as(steps), atol=1e-4)
    assert out.min() >= 0 and out.max() <= 31


def test_vflip_auto_flips_in_memory_data_only_and_says_so_while_a_set_value_is_kept() -> None:
    kept, said = fit_augment(AugmentConfig(), streamed=False)
    assert kept.vflip is True and "augment.vflip: auto" in said["augment"]
    streamed, said = fit_augment(AugmentConfig(), streamed=True)
    assert streamed.vflip is False and "horizontally in the workers" in said["augment"]
    assert fit_augment(AugmentConfig(vflip=False), streamed=False) == (AugmentConfig(vflip=False), {})
