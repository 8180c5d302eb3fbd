"""Fine-tuning (ViT lecture): start from pretrained weights, new zero head, resampled position embedding.

The pretrained tensors come from a vitlab run, a timm-format file, a Google ViT `.npz` or a Hugging Face
ViT folder, each through its filter in `vitlab.models.weights`; `fit_to_model` there makes them fit the new
model (image size, class count), and the training loop then runs as from scratch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vitlab.config import FinetuneConfig
from vitlab.errors import VitlabError
from vitlab.models.vit import VisionTransformer
from vitlab.models.weights import (
    check_weights,
    filter_google_vit,
    filter_hf_vit,
    filter_timm_vit,
    fit_to_model,
    is_hf_folder,
    load_state_dict_strict,
    read_hf_folder,
    read_npz,
    read_state_dict,
)
from vitlab.runs import checkpoint as ckpt


def checkpoint_format(path: str | Path, kind: str = "auto") -> str:
    """`vitlab`, `timm`, `npz` or `hf` (a folder with a config.json, of any model type): the given format, or `path`'s."""
    if kind != "auto":
        return kind
    path = Path(path)
    if path.is_dir():
        return "hf" if is_hf_folder(path) else "vitlab"
    return "npz" if path.suffix == ".npz" else "timm"


FORMAT_NAMES = {"vitlab": "vitlab run", "timm": "timm file", "npz": "Google ViT .npz", "hf": "Hugging Face ViT folder"}


def position_change(pos_embed: torch.Tensor | None, model: VisionTransformer) -> str:
    """What fitting does to a pretrained position embedding: resampled from its grid to the model's, or kept."""
    if pos_embed is None:
        return "no pretrained position embedding"
    if not isinstance(model, VisionTransformer):  # the paper code's ai602-…: loaded as it is
        return f"position embedding of {pos_embed.shape[1]} tokens"
    side, grid = math.isqrt(pos_embed.shape[1] - model.num_prefix_tokens), model.patch_embed.grid
    if side == grid:
        return f"position embedding kept ({grid}×{grid} patches)"
    return f"position embedding resampled {side}×{side} → {grid}×{grid} patches"


def pretrained_state_dict(path: str | Path, kind: str, model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The pretrained tensors at `path` under vitlab's names, read by the filter of their format."""
    if not Path(path).exists():
        raise VitlabError(f"finetune.checkpoint {path} does not exist")
    kind = checkpoint_format(path, kind)
    if kind == "vitlab":
        checkpoint = ckpt.find_checkpoint(path)
        tensors = ckpt.load_tensors(checkpoint)
        check_weights(tensors, str(checkpoint))
        return tensors
    if not isinstance(model, VisionTransformer):  # a BiT ResNet: its tensor names are timm's ResNetV2's
        if kind != "timm":
            raise VitlabError(f"finetune.format={kind} holds ViTs; a {type(model).__name__} reads timm files or vitlab runs")
        return read_state_dict(path)
    if kind == "npz":
        return filter_google_vit(read_npz(path), model.config["num_heads"])
    if kind == "hf":
        return filter_hf_vit(*read_hf_folder(path), model)
    return filter_timm_vit(read_state_dict(path), model)


def prepare_model(model: VisionTransformer, cfg: FinetuneConfig | None, load: bool) -> tuple[VisionTransformer, str | None]:
    """Fine-tuning set-up of a freshly built `model`: the pretrained weights (if `load`) and the frozen backbone;
    with a line for the start block that says what was loaded and fitted (None without fine-tuning).

    A resumed run passes `load=False`: its checkpoint holds the weights, but the backbone stays frozen.
    """
    if cfg is None:
        return model, None
    if not cfg.keep_head and not hasattr(model, "reset_head"):  # the paper code's ai602-…: an MLP head with BatchNorm
        raise VitlabError(
            f"{type(model).__name__} has no replaceable head to fine-tune; fine-tune a vit-… or vit22b-… preset, "
            "or set finetune.keep_head: true"
        )
    said = f"pretrained from {cfg.checkpoint}; the weights come from the resumed checkpoint"
    if load:
        kind = checkpoint_format(cfg.checkpoint, cfg.format)
        source = pretrained_state_dict(cfg.checkpoint, kind, model)
        if not cfg.keep_head:
            model.reset_head(model.num_classes, zero=True)  # Dosovitskiy et al. 2021 fine-tune a new zero head
        load_state_dict_strict(model, fit_to_model(source, model, cfg.keep_head), f"finetune.checkpoint {cfg.checkpoint}")
        head = "pretrained head kept" if cfg.keep_head else "new zero head"
        said = (
            f"{FORMAT_NAMES[kind]} {cfg.checkpoint}: {position_change(source.get('pos_embed'), model)}, "
            f"{head} of {model.num_classes} classes"
        )
    if cfg.freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("head."))
        said += ", backbone frozen (the head alone trains)"
    return model, said
