"""One optimizer step for every training loop: loss scaling, unscale, clipping, a finiteness check, step.

The object of MAE's `NativeScalerWithGradNormCount` (util/misc.py) and timm's `NativeScaler`: a loop
calls `backward` for each (micro-)loss, then `step` once, then `update` once per training step (after
every optimizer it has, as CycleGAN steps two on one loss scale). A step whose loss or gradient norm is
not finite on any rank is skipped; with fp16, a skip while the scale still backs off is an overflow
(the scaler finding its range), not a sign of divergence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vitlab.runtime import distributed
from vitlab.runtime.precision import make_grad_scaler, scaler_backs_off


@dataclass(frozen=True)
class StepResult:
    """What a step did: whether it was taken, whether a skip was an fp16 overflow, and the gradient norm (before clipping)."""

    finite: bool
    overflow: bool
    grad_norm: torch.Tensor


class OptimizerStep:
    """Scale, backward, unscale, clip by value and by norm, check finiteness across ranks, step; one per run."""

    def __init__(
        self, precision: str, device: torch.device, clip_grad_norm: float | None = None, clip_grad_value: float | None = None
    ):
        self.scaler = make_grad_scaler(precision, device)
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`, scaled when fp16 loss scaling is on."""
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], loss: torch.Tensor) -> StepResult:
        """Unscale and clip the gradients of `parameters`, then step `optimizer` if `loss` and the gradients are finite."""
        parameters = list(parameters)
        self.scaler.unscale_(optimizer)  # clipping and the finiteness check see the true gradients
        if self.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(parameters, self.clip_grad_value)
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(parameters, self.clip_grad_norm or math.inf))
        finite = distributed.all_reduce(torch.isfinite(loss.detach() + grad_norm).float(), "min").item() == 1.0
        overflow = not finite and math.isfinite(loss.item()) and scaler_backs_off(self.scaler)
        if finite:
            self.scaler.step(optimizer)
        return StepResult(finite, overflow, grad_norm)

    def update(self) -> None:
        """Adjust the loss scale after this training step's optimizer steps."""
        self.scaler.update()

    def state_dict(self) -> dict:
        """The loss scaler's state for the checkpoint metadata (empty without fp16)."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_state_dict(self, meta: dict) -> None:
        """Restore the loss scaler from checkpoint metadata written by `state_dict`."""
        if self.scaler.is_enabled() and "grad_scaler" in meta:
            self.scaler.load_state_dict(meta["grad_scaler"])
