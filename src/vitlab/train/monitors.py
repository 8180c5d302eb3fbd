"""Stability monitors: the signals of "Deeper Inside Deep ViT" Fig. 1 and of the ViT-22B paper.

The loop asks the monitor to watch the steps it logs; everything else runs untouched.
  max_logit      largest classifier output of the batch (what the paper plotted, Fig. 1),
  max_abs_grad   largest |gradient| over all parameters (the paper's gradient curve),
  grad_norm      global L2 norm of the gradients (measured by the loop's clipping call),
  attn_logit_max/L  largest pre-softmax attention logit of layer L (Dehghani et al. 2023, Sec. 3.1.2:
                 these grew until attention collapsed, which QK LayerNorm prevents),
  attn_entropy/L mean entropy (nats) of layer L's attention distributions; its collapse to 0 is
                 the failure mode QK LayerNorm fixes,
  log_z          mean logsumexp of the classifier's logits: output-logit divergence, which the z-loss holds at 0
                 (Wortsman et al. 2023, arXiv 2309.14322, Sec. 3.2),
  update_rms     Adam's update RMS √mean(g²/max(v̂, ε²)) over every parameter, and update_rms_max the largest
                 over tensors: above 1 the second moment lags the gradient, the loss-spike predictor of
                 Wortsman et al. 2023b (arXiv 2304.13013, StableAdamW),
  high_norm_tokens  the fraction of tokens entering the final norm whose L2 norm is above HIGH_NORM_FACTOR × the
                 batch median: the artifact tokens of Darcet et al. 2023 ("Vision Transformers Need Registers").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.distributed.tensor import DTensor

from vitlab.models.blocks import watch_attention
from vitlab.runtime import distributed

HIGH_NORM_FACTOR = 4.0  # Darcet et al.'s artifacts were ~10× the other tokens' norms; 4× separates the two modes


def attention_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of softmax(logits) over the last axis."""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def max_abs_grad(model: torch.nn.Module) -> torch.Tensor:
    """Largest |gradient| over every parameter that has one; with FSDP, over every rank's shards (collective)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    largest = torch.stack([g.detach().abs().max() for g in local if g.numel()] or [torch.zeros(())]).max()
    return distributed.all_reduce(largest, "max") if any(isinstance(g, DTensor) for g in grads) else largest


def high_norm_fraction(tokens: torch.Tensor) -> torch.Tensor:
    """The fraction of tokens (…, D) whose L2 norm is above HIGH_NORM_FACTOR × the median token norm."""
    norms = tokens.detach().float().norm(dim=-1).flatten()
    return (norms > HIGH_NORM_FACTOR * norms.median()).float().mean()


def adam_update_rms(optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's update RMS √mean(g²/max(v̂, ε²)) over all elements, and its largest value over tensors.

    v̂ is the bias-corrected second moment after this step; read after `optimizer.step()` and before `zero_grad`.
    Over this rank's shards with FSDP. Zeros for an optimizer without a second moment (SGD).
    """
    sums, counts = [], []
    for group in optimizer.param_groups:
        beta2, eps = group.get("betas", (0.0, 0.0))[1], group.get("eps", 0.0)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if p.grad is None or "exp_avg_sq" not in state:
                continue
            grad, v = p.grad, state["exp_avg_sq"]
            grad, v = (t.to_local() if isinstance(t, DTensor) else t for t in (grad, v))
            v_hat = v.float() / (1 - beta2 ** float(state["step"]))
            sums.append((grad.float() ** 2 / v_hat.clamp_min(eps**2)).sum())
            counts.append(grad.numel())
    if not sums:
        return torch.zeros(()), torch.zeros(())
    per_tensor = torch.stack(sums) / torch.tensor(counts, device=sums[0].device)
    return (torch.stack(sums).sum() / sum(counts)).sqrt(), per_tensor.max().sqrt()


class StabilityMonitor:
    """Collects one step's stability signals when asked to watch it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.values: dict[str, float] = {}
        self.attention: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.high_norm: torch.Tensor | None = None

    def _record(self, layer: int, logits: torch.Tensor) -> None:
        self.attention[layer] = (logits.max(), attention_entropy(logits))

    def _record_tokens(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if inputs[0].ndim == 3:  # tokens (B, T, D); a ResNet's final norm sees a feature map
            self.high_norm = high_norm_fraction(inputs[0])

    @contextmanager
    def watch(self, active: bool) -> Iterator[None]:
        """Record attention and token-norm statistics during the forward pass of this step, if `active`."""
        self.attention, self.high_norm = {}, None
        final_norm = getattr(self.model, "norm", None) if active else None
        hook = final_norm.register_forward_pre_hook(self._record_tokens) if isinstance(final_norm, torch.nn.Module) else None
        try:
            with watch_attention(self.model, self._record) if active else nullcontext():
                yield
        finally:
            if hook is not None:
                hook.remove()

    def collect(self, logits: torch.Tensor, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """This step's signals, after the optimizer's step and before `zero_grad`: one host sync for all of them."""
        logits = logits.detach().float()
        names = ["max_logit", "log_z", "max_abs_grad", "grad_norm", "update_rms", "update_rms_max"]
        tensors = [logits.max(), logits.logsumexp(-1).mean(), max_abs_grad(self.model), grad_norm.detach().float()]
        tensors += adam_update_rms(optimizer)
        if self.high_norm is not None:
            names.append("high_norm_tokens")
            tensors.append(self.high_norm)
        for layer, (logit_max, entropy) in sorted(self.attention.items()):
            names += [f"attn_logit_max/{layer}", f"attn_entropy/{layer}"]
            tensors += [logit_max, entropy]
        self.values.update(zip(names, torch.stack([t.float().cpu() for t in tensors]).tolist()))
        return self.values

    def summary(self) -> str:
        """The last collected maxima, for an error message."""
        if not self.values:
            return "no step monitored yet"
        attn = [v for k, v in self.values.items() if k.startswith("attn_logit_max/")]
        parts = [
            f"max logit {self.values['max_logit']:.4g}",
            f"max |grad| {self.values['max_abs_grad']:.4g}",
            f"grad norm {self.values['grad_norm']:.4g}",
        ]
        if attn:
            parts.append(f"max attention logit {max(attn):.4g}")
        return ", ".join(parts)


class LossAboveStart:
    """Counts evaluations in a row whose test loss is above (or not finite against) ℓ₀, the test loss at step 0."""

    def __init__(self, patience: int, state: dict):
        self.patience, self.l0, self.above = patience, state.get("l0"), state.get("evals_above_l0", 0)

    def exceeded(self, loss: float) -> bool:
        """Count this evaluation; True when `patience` of them in a row were above ℓ₀."""
        self.above = 0 if math.isfinite(loss) and loss <= self.l0 else self.above + 1
        return self.above >= self.patience

    def state_dict(self) -> dict:
        return {"l0": self.l0, "evals_above_l0": self.above}
