"""Unpaired domains: the built-in sepia ↔ cyanotype pair with known truth, the CycleGAN folder layout, pairing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vitlab.data.unpaired import (
    CYANOTYPE,
    SEPIA,
    builtin_pair,
    epoch_length,
    index_batches,
    load_pair,
    random_window,
    tone_map,
    unpaired_batches,
)
from vitlab.errors import VitlabError


def test_builtin_pair_sizes_and_determinism() -> None:
    first = builtin_pair(num_train=12, num_test=5, seed=3, load_size=20, crop_size=16)
    again = builtin_pair(num_train=12, num_test=5, seed=3, load_size=20, crop_size=16)
    assert first.train_a.shape == first.train_b.shape == (12, 3, 20, 20)
    assert first.test_a.shape == first.truth_ab.shape == (5, 3, 16, 16)
    assert all(torch.equal(getattr(first, k), getattr(again, k)) for k in ("train_a", "train_b", "test_a", "truth_ba"))
    # A is warm (red >= blue at every pixel), B is cool.
    assert (first.train_a[:, 0] >= first.train_a[:, 2]).all() and (first.train_b[:, 2] >= first.train_b[:, 0]).all()


def test_truth_is_the_same_scene_under_the_other_tone_curve() -> None:
    data = builtin_pair(num_train=2, num_test=6, seed=0, load_size=16, crop_size=16, noise_std=0.0)
    # Each A pixel is a colour of the sepia curve; its truth is the cyanotype colour at the same grey level.
    grey = torch.linspace(0, 1, 256)[None, :, None]
    sepia, cyan = tone_map(grey, SEPIA)[0, :, :, 0].T, tone_map(grey, CYANOTYPE)[0, :, :, 0].T  # (256, 3) each
    a = data.test_a.permute(0, 2, 3, 1).reshape(-1, 3).float()
    level = torch.cdist(a, sepia.float()).argmin(1)
    assert (cyan[level].float() - data.truth_ab.permute(0, 2, 3, 1).reshape(-1, 3)).abs().max() <= 3
    assert (data.test_a.float() - data.truth_ab.float()).abs().mean() / 255 > 0.15  # the identity is far off


def test_tone_curves_are_monotone_so_the_mapping_is_invertible() -> None:
    for curve in (SEPIA, CYANOTYPE):
        rgb = tone_map(torch.linspace(0, 1, 101)[None, :, None], curve)[0, :, :, 0].float()
        assert (rgb.diff(dim=1) >= 0).all() and (rgb.sum(0).diff() > 0).all()


def test_unknown_builtin_knob_is_named() -> None:
    with pytest.raises(VitlabError, match="data.builtin: unknown key.*'noise'"):
        builtin_pair(num_train=2, num_test=2, noise=0.1)


def _write_layout(root: Path, counts: dict[str, int], size: tuple[int, int] = (40, 30)) -> None:
    for folder, count in counts.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, (10 * i, 100, 200)).save(root / folder / f"{i}.png")
        (root / folder / "readme.txt").write_text("not an image")


def test_cyclegan_folders_are_read_at_load_and_crop_size(tmp_path: Path) -> None:
    _write_layout(tmp_path, {"trainA": 3, "trainB": 2, "testA": 2, "testB": 1})
    data = load_pair("folder", tmp_path, load_size=24, crop_size=16)
    assert data.train_a.shape == (3, 3, 24, 24) and data.train_b.shape == (2, 3, 24, 24)
    assert data.test_a.shape == (2, 3, 16, 16) and data.test_b.shape == (1, 3, 16, 16)
    assert not data.has_truth and int(data.test_a[1, 0, 5, 5]) == 10
    test_only = load_pair("folder", tmp_path, load_size=24, crop_size=16, with_train=False)
    assert len(test_only.train_a) == 0 and torch.equal(test_only.test_a, data.test_a)


def test_missing_or_empty_folders_are_named(tmp_path: Path) -> None:
    _write_layout(tmp_path, {"trainA": 1, "testA": 1, "testB": 0})
    with pytest.raises(VitlabError, match="missing folder.*trainB.*trainA,trainB,testA,testB"):
        load_pair("folder", tmp_path, 24, 16)
    (tmp_path / "trainB").mkdir()
    with pytest.raises(VitlabError, match="no images in .*trainB, .*testB"):
        load_pair("folder", tmp_path, 24, 16)


def test_unreadable_image_is_an_error_naming_it(tmp_path: Path) -> None:
    _write_layout(tmp_path, {"trainA": 1, "trainB": 1, "testA": 1, "testB": 1})
    (tmp_path / "testB" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(VitlabError, match="cannot read 1 image.*broken.png"):
        load_pair("folder", tmp_path, 24, 16)


def test_load_size_below_crop_size_is_refused() -> None:
    with pytest.raises(VitlabError, match="load_size=16 must be at least crop_size=24"):
        load_pair("builtin", None, 16, 24)


def test_epoch_pairs_shuffled_a_with_random_b() -> None:
    batches = unpaired_batches(n_a=10, n_b=25, batch_size=4, epoch=0, seed=1)
    assert len(batches) == 6  # the larger domain sets the epoch: 25 // 4
    a = torch.cat([ia for ia, _ in batches])
    b = torch.cat([ib for _, ib in batches])
    assert sorted(a[:10].tolist()) == list(range(10)) and sorted(a[10:20].tolist()) == list(range(10))
    assert b.min() >= 0 and b.max() < 25
    same = unpaired_batches(10, 25, 4, 0, 1)
    other = unpaired_batches(10, 25, 4, 1, 1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(batches, same))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(batches, other))


def test_random_window_cuts_crops_from_the_image() -> None:
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    crops = random_window(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 4, 4)
    for image, crop in zip(images, crops):
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 6)
        assert torch.equal(crop, image[:, top : top + 4, left : left + 4])


def test_index_pairing_keeps_a_i_with_b_i_and_the_epoch_is_the_smaller_domain() -> None:
    batches = index_batches(n_a=10, n_b=25, batch_size=4, epoch=0, seed=1)
    assert len(batches) == 2 == epoch_length("index", 10, 25, 4) and epoch_length("random", 10, 25, 4) == 6
    assert all(torch.equal(a, b) for a, b in batches)  # the paper's code: dataset[i] = (A[i], B[i])
    seen = torch.cat([a for a, _ in batches])
    assert len(set(seen.tolist())) == 8 and seen.max() < 10
    assert not torch.equal(seen, torch.cat([a for a, _ in index_batches(10, 25, 4, 1, 1)]))
