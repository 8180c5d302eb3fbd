"""Stability monitors: the signals of "Deeper Inside Deep ViT" Fig. 1 and of the ViT-22B paper.

The loop asks the monitor to watch the steps it logs; everything else runs untouched.
  max_logit      largest classifier output of the batch (what the paper plotted, Fig. 1),
  max_abs_grad   largest |gradient| over all parameters (the paper's gradient curve),
  grad_norm      global L2 norm of the gradients (measured by the loop's clipping call),
  attn_logit_max/L  largest pre-softmax attention logit of layer L (Dehghani et al. 2023, Sec. 3.1.2:
                 these grew until attention collapsed, which QK LayerNorm prevents),
  attn_entropy/L mean entropy (nats) of layer L's attention distributions; its collapse to 0 is
                 the failure mode QK LayerNorm fixes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.distributed.tensor import DTensor

from vitlab.models.blocks import watch_attention
from vitlab.runtime import distributed


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


class StabilityMonitor:
    """Collects one step's stability signals when asked to watch it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.values: dict[str, float] = {}
        self.attention: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _record(self, layer: int, logits: torch.Tensor) -> None:
        self.attention[layer] = (logits.max(), attention_entropy(logits))

    @contextmanager
    def watch(self, active: bool) -> Iterator[None]:
        """Record attention statistics during the forward pass of this step, if `active`."""
        self.attention = {}
        with watch_attention(self.model, self._record) if active else nullcontext():
            yield

    def collect(self, logits: torch.Tensor, grad_norm: torch.Tensor) -> dict[str, float]:
        """This step's signals, after backward: one host sync for all of them."""
        names = ["max_logit", "max_abs_grad", "grad_norm"]
        tensors = [logits.detach().float().max(), max_abs_grad(self.model), grad_norm.detach().float()]
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
