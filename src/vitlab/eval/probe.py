"""Linear probing: a linear classifier on an encoder's frozen features, MAE's measure of a representation.

Following He et al. 2022 (App. A.2), the linear layer is preceded by a BatchNorm without affine
parameters, which normalises the features (whose scales differ from encoder to encoder) and
changes nothing else; the features are computed once, without augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.config import PretrainConfig, apply_overrides, from_dict, merge_defaults
from vitlab.data import load_splits
from vitlab.data.augment import normalize
from vitlab.data.dataset import ImageDataset
from vitlab.data.sources import streams
from vitlab.errors import AT_LEAST_1, POSITIVE, VitlabError, check_range
from vitlab.models.vit import VisionTransformer
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.builders import build_model
from vitlab.runs.stored import load_run
from vitlab.runtime.context import local
from vitlab.runtime.precision import autocast


@torch.no_grad()
def features(
    encoder: VisionTransformer,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    precision: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """The pooled features (class token, or mean of the patch tokens; what the head would see) of uint8 `images`, on the CPU."""
    encoder.eval()
    out = []
    for batch in images.split(batch_size):
        with autocast(device, precision):
            tokens = encoder.forward_features(normalize(batch.to(device), mean, std))
        out.append(encoder.pooled(tokens).float().cpu())
    return torch.cat(out)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    epochs: int = 90,
    lr: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Test accuracy of BatchNorm (affine=False) + linear trained by SGD with momentum and cosine LR (MAE, App. A.2)."""
    gen = torch.Generator().manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], num_classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01, generator=gen)  # MAE's probe init
    nn.init.zeros_(probe[1].bias)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    steps_per_epoch = max(1, len(train_x) // batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_x), generator=gen)
        idx = order[(step % steps_per_epoch) * batch_size :][:batch_size]
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        F.cross_entropy(probe(train_x[idx]), train_y[idx]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    probe.eval()
    with torch.no_grad():
        return (probe(test_x).argmax(-1) == test_y).float().mean().item()


def labelled_splits(config: PretrainConfig, num_train: int | None) -> tuple[ImageDataset, ImageDataset]:
    """The run's dataset with its labels: the first `num_train` training images (all when None) and the test split."""
    d = config.data
    count = min(num_train or d.num_train, d.num_train)
    splits = load_splits(
        d.name,
        d.root,
        d.image_size,
        d.download,
        num_train=count,
        num_test=d.num_test,
        seed=d.seed,
        image_column=d.image_column,
        label_column=d.label_column,
        **d.builtin,
    )
    train = splits.train
    if num_train is not None and num_train < len(train):
        train = ImageDataset(train.images[:num_train], train.labels[:num_train], train.classes)
    return train, splits.test


def probe_data(config: PretrainConfig, overrides: Sequence[str]) -> PretrainConfig:
    """The run's config with `data.…=value` overrides (another labelled dataset); it must be held in memory."""
    if overrides:
        other = [o for o in overrides if not o.startswith("data.")]
        if other:
            raise VitlabError(f"vitlab probe --set changes the data only (data.name=…, data.root=…), not {', '.join(other)}")
        changed = apply_overrides(config.to_dict(), list(overrides), PretrainConfig)
        config = from_dict(PretrainConfig, merge_defaults(PretrainConfig, changed)).validate()
    if streams(config.data):
        raise VitlabError(
            f"vitlab probe holds its labelled images in memory and data.name={config.data.name} is streamed; "
            "probe on an in-memory labelled set: --set data.name=folder --set data.root=DIR "
            "(or cifar10, cifar100) --set data.stream=false"
        )
    return config


def probe_run(
    path: str | Path,
    num_train: int | None = None,
    epochs: int = 90,
    lr: float = 0.1,
    batch_size: int = 256,
    random_init: bool = False,
    seed: int = 0,
    data: Sequence[str] = (),
) -> dict:
    """Linear-probe accuracy of a pretraining run's encoder (or, `random_init`, of the same encoder untrained).

    `data`: `data.…=value` overrides, to probe on another labelled dataset than the run's.
    """
    for flag, value, allowed in (
        ("--num-train", num_train, AT_LEAST_1),
        ("--epochs", epochs, AT_LEAST_1),
        ("--lr", lr, POSITIVE),
        ("--batch-size", batch_size, AT_LEAST_1),
    ):
        if value is not None:
            check_range(flag, value, allowed)
    checkpoint, config, _ = load_run(path, PretrainConfig)
    config = probe_data(config, data)
    torch.manual_seed(seed)
    encoder = build_model(config, config.data.image_size, num_classes=0)
    if not random_init:
        ckpt.load_weights(checkpoint, encoder)
    ctx = local(config.train.device, config.train.precision)
    device, precision = ctx.device, ctx.precision
    encoder.to(device)
    train, test = labelled_splits(config, num_train)
    feats = [features(encoder, s.images, batch_size, device, precision, config.data.mean, config.data.std) for s in (train, test)]
    acc = linear_probe(feats[0], train.labels, feats[1], test.labels, train.num_classes, epochs, lr, batch_size, seed)
    return {
        "checkpoint": str(checkpoint),
        "encoder": "random init" if random_init else "pretrained",
        "train_images": len(train),
        "test_images": len(test),
        "epochs": epochs,
        "acc1": acc,
    }


def probe_line(result: dict) -> str:
    """`probe_run`'s result in one readable line."""
    return (
        f"linear probe of the {result['encoder']} encoder of {result['checkpoint']}: test acc@1 {100 * result['acc1']:.2f} % "
        f"on {result['test_images']:,} images (trained on {result['train_images']:,} for {result['epochs']} epochs)"
    )
