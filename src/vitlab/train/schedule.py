"""Learning-rate shapes, as multipliers of the base LR that are pure functions of the step (so a resume needs no state)."""

from __future__ import annotations

import math

from vitlab.config import OptimConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base LR at `step`: linear warm-up, then cosine, multistep or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "multistep":  # the paper: decay by gamma at 30 %, 60 %, 90 % of training
        return cfg.gamma ** sum(step >= m * total_steps for m in cfg.milestones)
    return 1.0


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """The warm-up length in steps: `optim.warmup_steps` when set, else `optim.warmup_epochs` of steps."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)


def constant_then_linear(step: int, constant_steps: int, total_steps: int) -> float:
    """CycleGAN's multiplier: 1 for `constant_steps`, then linear down to 0 at `total_steps`."""
    if step < constant_steps:
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - constant_steps))
