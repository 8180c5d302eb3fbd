"""Fine-tuning (ViT lecture): start from pretrained weights, new zero head, resampled position embedding.

The pretrained tensors come from a vitlab run, a timm-format file, a Google ViT `.npz` or a Hugging Face
ViT folder, each
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
    check_weights,
    filter_google_vit,
    filter_hf_vit,
    filter_timm_vit,
    is_hf_folder,
    load_state_dict_strict,
    read_hf_folder,
    read_npz,
    read_state_dict,
    resample_pos_embed,
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
    if kind == "npz":
        return filter_google_vit(read_npz(path), model.config["num_heads"])
    if kind == "hf":
        return filter_hf_vit(*read_hf_folder(path), model)
    return filter_timm_vit(read_state_dict(path), model)


def fit_to_model(state_dict: dict[str, torch.Tensor], model: VisionTransformer, keep_head: bool) -> dict[str, torch.Tensor]:
    """Pretrained tensors made to fit `model`: position embedding resampled to its patch grid, head replaced.

    Unless `keep_head`, the head becomes a zero-initialised one for the model's classes and a
    pretrained pre-logits layer the model has no place for is dropped (Dosovitskiy et al. 2021
    replace the whole head by one zero-initialised linear layer).
    """
    own = model.state_dict()
    fitted = dict(state_dict)
    pos = fitted.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape and pos.ndim == 3 and len(pos) == 1:
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
