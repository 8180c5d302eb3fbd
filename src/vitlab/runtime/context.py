"""The runtime of a command, worked out once: device, rank, world size, precision and why it was chosen."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlab.runtime import distributed
from vitlab.runtime.precision import autocast, choose_precision


@dataclass(frozen=True)
class Runtime:
    """Where this process computes and how: its rank among `world_size`, its device, and its precision with the reason."""

    rank: int
    world_size: int
    device: torch.device
    precision: str = "fp32"
    precision_reason: str = "set by the caller"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """bf16 or fp16 autocast on this device, or nothing for fp32."""
        return autocast(self.device, self.precision)


def _settle(rank: int, world_size: int, device: torch.device, precision: str, threads: int | None) -> Runtime:
    chosen, reason = choose_precision(precision, device)
    if threads:
        torch.set_num_threads(threads)
    return Runtime(rank, world_size, device, chosen, reason)


def start(device: str = "auto", precision: str = "auto", threads: int | None = None) -> Runtime:
    """A training command's runtime: joins torchrun's process group when launched by it, picks the precision, sets threads."""
    return _settle(*distributed.join(device), precision, threads)


def local(device: str = "auto", precision: str = "auto", threads: int | None = None) -> Runtime:
    """A one-process runtime (evaluation, prediction, the probe, CycleGAN): no process group."""
    return _settle(0, 1, distributed.pick_device(device), precision, threads)
