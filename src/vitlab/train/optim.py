"""Optimizers and their parameter groups: weight-decay exclusions and layer-wise LR decay."""

from __future__ import annotations

import torch

from vitlab.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases, norms, position embedding and tokens; layer-wise LR decay."""
    groups = parameter_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.decay_all)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.independent_weight_decay:
        # Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities"):
        # AdamW decays θ ← θ − s_t·η·λ·θ (s_t the schedule factor, η the peak LR); independent decay is
        # θ ← θ − s_t·λ·θ. torch's AdamW multiplies its group's decay by the group's LR, which the loop sets to
        # η·s_t·lr_scale (`Run.set_lr`), so a group decaying by λ / (η·lr_scale) decays by s_t·λ per step.
        for group in groups:
            group["weight_decay"] /= cfg.lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def layer_index(name: str, depth: int) -> int:
    """A parameter's depth for layer-wise LR decay: 0 the embeddings, i + 1 block i, depth + 1 the norm and head."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


NO_DECAY = ("pos_embed", "cls_token", "mask_token", "reg_token")  # tokens and positions: looked up, not multiplied


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, layer_decay: float | None = None, decay_all: bool = False
) -> list[dict]:
    """Optimizer groups of the trainable parameters, each with an `lr_scale` the loop multiplies the LR by.

    No weight decay on biases, norms, position embedding, class, register and mask tokens (also inside a wrapper such as
    MAE's `encoder.pos_embed`), unless `decay_all` (the paper's
    code gave AdamW every parameter). With `layer_decay`, a parameter at depth l (see `layer_index`) of a
    model with L blocks learns at lr·decay^(L+1-l).
    """
    depth = len(model.blocks) if layer_decay is not None else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = decay_all or (param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY)
        layer = layer_index(name, depth) if layer_decay is not None else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        group = dict(params=[], weight_decay=weight_decay if decay else 0.0, lr_scale=scale)
        groups.setdefault((layer, decay), group)["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0], not key[1]))]
