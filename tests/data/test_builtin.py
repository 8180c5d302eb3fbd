"""The procedural shape dataset: determinism, balance, and difficulty (linear probe low, small CNN high)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.data.builtin import BUILTIN_CLASSES, BuiltinDifficulty, builtin_splits, make_builtin
from vitlab.errors import VitlabError


def test_same_seed_is_bit_identical_whatever_the_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = make_builtin(300, seed=11)
        torch.set_num_threads(2)
        two = make_builtin(300, seed=11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)


def test_different_seeds_and_splits_differ() -> None:
    a, b = make_builtin(200, seed=0), make_builtin(200, seed=1)
    assert not torch.equal(a.images, b.images)
    splits = builtin_splits(num_train=200, num_test=200, seed=0)
    assert not torch.equal(splits.train.images, splits.test.images)
    assert torch.equal(builtin_splits(num_train=200, num_test=200, seed=0).test.images, splits.test.images)


def test_shapes_dtypes_and_balanced_labels() -> None:
    splits = builtin_splits(num_train=1000, num_test=205, seed=2, image_size=40)
    assert len(BUILTIN_CLASSES) >= 10 and splits.train.classes == BUILTIN_CLASSES
    assert splits.train.images.shape == (1000, 3, 40, 40) and splits.test.images.shape == (205, 3, 40, 40)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    counts = torch.bincount(splits.train.labels, minlength=splits.train.num_classes)
    assert counts.tolist() == [100] * 10
    assert set(torch.bincount(splits.test.labels).tolist()) == {20, 21}
    assert splits.train.images.float().std() > 40, "images use the intensity range"


def test_difficulty_options_are_checked() -> None:
    with pytest.raises(VitlabError, match="data.builtin: unknown key.*'noise'.*knobs.*noise_std"):
        builtin_splits(num_train=10, num_test=10, noise=0.1)
    with pytest.raises(VitlabError, match="scale_range"):
        BuiltinDifficulty(scale_range=(0.3, 0.2))
    easy = builtin_splits(num_train=20, num_test=10, noise_std=0.0, num_blobs=0, num_lines=0, gradient=0.0)
    assert len(easy.train) == 20


def _standardised(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_train, x_test = train.flatten(1).float(), test.flatten(1).float()
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    return (x_train - mean) / std, (x_test - mean) / std


def test_linear_classifier_on_raw_pixels_is_above_chance_but_far_from_solving_it() -> None:
    # Ridge regression onto one-hot targets: the least-squares linear classifier, solved exactly,
    # so the probe is as good as a linear map gets here (logistic regression: see the slow test).
    splits = builtin_splits(num_train=5000, num_test=2000, seed=0)
    x_train, x_test = _standardised(splits.train.images, splits.test.images)
    targets = F.one_hot(splits.train.labels).float()
    gram = x_train.T @ x_train + 1e4 * torch.eye(x_train.shape[1])
    weights = torch.cholesky_solve(x_train.T @ targets, torch.linalg.cholesky(gram))
    accuracy = ((x_test @ weights).argmax(1) == splits.test.labels).float().mean().item()
    chance = 1 / splits.train.num_classes
    assert chance + 0.03 < accuracy <= 0.60, f"linear probe test accuracy {accuracy:.3f}"


@pytest.mark.slow
def test_logistic_regression_on_raw_pixels_stays_low() -> None:
    """The same bound for multinomial logistic regression (full-batch L-BFGS; about a minute)."""
    splits = builtin_splits(num_train=5000, num_test=2000, seed=0)
    x_train, x_test = _standardised(splits.train.images, splits.test.images)
    linear = nn.Linear(x_train.shape[1], splits.train.num_classes)
    nn.init.zeros_(linear.weight)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=100, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x_train), splits.train.labels) + 0.05 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        accuracy = (linear(x_test).argmax(1) == splits.test.labels).float().mean().item()
    print(f"logistic regression on raw pixels: test accuracy {accuracy:.3f}")
    assert 1 / splits.train.num_classes + 0.03 < accuracy <= 0.60


@pytest.mark.slow
def test_small_cnn_learns_the_shapes() -> None:
    """Learnability: a small CNN on raw pixels (a few minutes on 2 CPU cores)."""
    splits = builtin_splits(num_train=20000, num_test=2000, seed=0)
    torch.manual_seed(0)

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    net = nn.Sequential(
        block(3, 32),
        nn.MaxPool2d(2),
        block(32, 64),
        nn.MaxPool2d(2),
        block(64, 128),
        nn.MaxPool2d(2),
        block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, splits.train.num_classes),
    )
    epochs, batch = 4, 128
    steps = epochs * (len(splits.train) // batch)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(splits.train), generator=gen)
        for step in range(len(splits.train) // batch):
            idx = order[step * batch : (step + 1) * batch]
            loss = F.cross_entropy(net(splits.train.images[idx].float() / 127.5 - 1), splits.train.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(splits.test.images.float() / 127.5 - 1).argmax(1) == splits.test.labels).float().mean()
    print(f"small CNN: test accuracy {accuracy:.3f} after {epochs} epochs, {time.perf_counter() - start:.0f} s")
    assert accuracy >= 0.9
