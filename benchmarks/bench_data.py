"""Throughput of the data path: built-in dataset generation and batch augmentation, in images/s.

    python benchmarks/bench_data.py [--batch 128] [--repeats 50] [--threads N]

Prints a markdown table (header and one row). Augmentation stages are cumulative: each batch is
fetched from the in-memory uint8 dataset by the BatchIterator, then (crop with 4 px zero padding
and horizontal flip on uint8), then RandAugment(2, 9) on floats, then Mixup/CutMix (0.8 / 1.0),
and is always normalised to float32. The stages take turns batch by batch, so they see the
same machine load; figures are medians over the repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vitlab.data.augment import mixup_cutmix, normalize, rand_augment, random_crop, random_flip
from vitlab.data.builtin import make_builtin
from vitlab.data.loader import BatchIterator

Stage = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def _load_only(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return normalize(images)


def _crop_flip(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return normalize(random_flip(random_crop(images, 4, gen), gen))


def _randaugment(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    x = random_flip(random_crop(images, 4, gen), gen).float() / 255
    return normalize(rand_augment(x, gen, num_ops=2, magnitude=9))


def _mix(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    x = random_flip(random_crop(images, 4, gen), gen).float() / 255
    x, _ = mixup_cutmix(rand_augment(x, gen, 2, 9), F.one_hot(labels, 10).float(), gen, 0.8, 1.0)
    return normalize(x)


STAGES: dict[str, Stage] = {
    "load only": _load_only,
    "crop+flip": _crop_flip,
    "+RandAugment": _randaugment,
    "+Mixup/CutMix": _mix,
}


def main() -> None:
    """Measure and print one markdown table row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--generate", type=int, default=50000, help="built-in images to generate and time")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    dataset = make_builtin(args.generate, seed=0)
    generate_s = time.perf_counter() - start

    loader = BatchIterator(dataset, args.batch, seed=0)
    gen = torch.Generator().manual_seed(0)
    seconds: dict[str, list[float]] = {name: [] for name in STAGES}
    batches = (batch for epoch in range(10**6) for batch in loader.epoch_batches(epoch))
    for repeat in range(args.repeats + 3):  # the first 3 warm up
        for name, stage in STAGES.items():
            start = time.perf_counter()
            images, labels = next(batches)
            stage(images, labels, gen)
            if repeat >= 3:
                seconds[name].append(time.perf_counter() - start)

    rates = [args.batch / statistics.median(seconds[name]) for name in STAGES]
    header = ["machine", "threads", "batch", "generate built-in", *STAGES]
    row = [
        f"{platform.machine()} x{os.cpu_count()}",
        str(torch.get_num_threads()),
        f"{args.batch}x3x32x32",
        f"{args.generate / generate_s:,.0f} ({args.generate:,} in {generate_s:.1f} s)",
        *(f"{rate:,.0f}" for rate in rates),
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
