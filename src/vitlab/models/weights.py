"""Loading foreign checkpoints into vitlab models: one filter function per source format."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from vitlab.errors import VitlabError
from vitlab.models.vit import VisionTransformer

# Wrappers that training scripts commonly put around a state dict in a .pth file.
_WRAPPER_KEYS = ("state_dict", "model", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.pth`/`.pt`/`.bin` file (the latter read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise VitlabError(f"cannot read {path.name}: expected a .safetensors, .pth, .pt or .bin file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; all mean the same to the user
        raise VitlabError(f"cannot read {path} as a weights-only PyTorch checkpoint: {exc}") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise VitlabError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load with every missing, unexpected or wrongly shaped tensor listed in one error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = [
        f"{title} ({len(items)}): {', '.join(items)}"
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise VitlabError(f"{source} does not fit the model; " + "; ".join(problems))
    model.load_state_dict(state_dict)


def load_timm_checkpoint(model: VisionTransformer, path: str | Path) -> VisionTransformer:
    """Load a timm-format ViT checkpoint (`.safetensors` or `.pth`) into `model`, strictly.

    vitlab's serial ViT uses timm's parameter names (cls_token, pos_embed, patch_embed.proj,
    blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, head), so the tensors map
    one to one; anything else (register tokens, fc_norm of timm's average-pool variant) is listed.
    """
    if model.config["block"] != "serial":
        raise VitlabError("timm checkpoints hold serial ViT blocks; build the model with block='serial' (a vit-* preset)")
    load_state_dict_strict(model, read_state_dict(path), str(path))
    return model
