"""Fine-tuning (ViT lecture): start from pretrained weights, new zero head, resampled position embedding.

The pretrained tensors come from a vitlab run, a timm-format file or a Google ViT `.npz`, each
through its filter in `vitlab.models.weights`; they are made to fit the new model (image size,
class count) here, and the training loop then runs as from scratch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitlab.config import FinetuneConfig
from vitlab.errors import VitlabError
from vitlab.models.vit import VisionTransformer
from vitlab.models.weights import (
    filter_google_vit, load_state_dict_strict, read_npz, read_state_dict, resample_pos_embed,
)  # fmt: skip
from vitlab.train import checkpoint as ckpt


def checkpoint_format(path: str | Path, kind: str = "auto") -> str:
    """`vitlab`, `timm` or `npz`: the given format, or the one `path` looks like."""
    if kind != "auto":
        return kind
    path = Path(path)
    if path.is_dir():
        return "vitlab"
    return "npz" if path.suffix == ".npz" else "timm"


def pretrained_state_dict(path: str | Path, kind: str, model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The pretrained tensors at `path` under vitlab's names, read by the filter of their format."""
    if not Path(path).exists():
        raise VitlabError(f"finetune.checkpoint {path} does not exist")
    kind = checkpoint_format(path, kind)
    if kind == "vitlab":
        return ckpt.load_tensors(ckpt.find_checkpoint(path))
    if kind == "npz":
        return filter_google_vit(read_npz(path), model.config["num_heads"])
    return read_state_dict(path)


def fit_to_model(
    state_dict: dict[str, torch.Tensor], model: VisionTransformer, keep_head: bool
) -> dict[str, torch.Tensor]:
    """Pretrained tensors made to fit `model`: position embedding resampled to its patch grid, head replaced.

    Unless `keep_head`, the head becomes a zero-initialised one for the model's classes and a
    pretrained pre-logits layer the model has no place for is dropped (Dosovitskiy et al. 2021
    replace the whole head by one zero-initialised linear layer).
    """
    own = model.state_dict()
    fitted = dict(state_dict)
    if "pos_embed" in fitted and "pos_embed" in own and fitted["pos_embed"].shape != own["pos_embed"].shape:
        grid = (model.patch_embed.grid, model.patch_embed.grid)
        fitted["pos_embed"] = resample_pos_embed(fitted["pos_embed"], grid, model.num_prefix_tokens)
    if not keep_head:
        fitted = {k: v for k, v in fitted.items() if not k.startswith(("head.", "pre_logits.")) or k in own}
        fitted |= {k: torch.zeros_like(v) for k, v in own.items() if k.startswith("head.")}
    return fitted


def prepare_model(model: VisionTransformer, cfg: FinetuneConfig | None, load: bool) -> VisionTransformer:
    """Fine-tuning set-up of a freshly built `model`: the pretrained weights (if `load`) and the frozen backbone.

    A resumed run passes `load=False`: its checkpoint holds the weights, but the backbone stays frozen.
    """
    if cfg is None:
        return model
    if load:
        source = pretrained_state_dict(cfg.checkpoint, cfg.format, model)
        fitted = fit_to_model(source, model, cfg.keep_head)
        load_state_dict_strict(model, fitted, f"finetune.checkpoint {cfg.checkpoint}")
    if cfg.freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("head."))
    return model


def layer_index(name: str, depth: int) -> int:
    """A parameter's depth for layer-wise LR decay: 0 the embeddings, i + 1 block i, depth + 1 the norm and head."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, layer_decay: float | None = None, decay_all: bool = False
) -> list[dict]:
    """Optimizer groups of the trainable parameters, each with an `lr_scale` the loop multiplies the LR by.

    No weight decay on biases, norms, position embedding and class token, unless `decay_all` (the paper's
    code gave AdamW every parameter). With `layer_decay`, a parameter at depth l (see `layer_index`) of a
    model with L blocks learns at lr·decay^(L+1-l).
    """
    depth = len(model.blocks) if layer_decay is not None else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = decay_all or (param.ndim >= 2 and name not in ("pos_embed", "cls_token"))
        layer = layer_index(name, depth) if layer_decay is not None else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        group = dict(params=[], weight_decay=weight_decay if decay else 0.0, lr_scale=scale)
        groups.setdefault((layer, decay), group)["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0], not key[1]))]
