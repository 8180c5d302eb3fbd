"""Loading foreign checkpoints into vitlab models: one filter function per source format."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
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


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file (no pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"checkpoint file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise VitlabError(f"cannot read {path} as an .npz file of arrays: {exc}") from exc


# Google's Flax ViT checkpoints, flattened with "/" separators: the original ViT release
# (google-research/vision_transformer, under "opt/target/" when saved by its trainer) names a block's
# layers LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3; big_vision (under
# "params/") names them LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0, keeps the
# position embedding at the top level without a slot for the class token, and with `scan` stacks all
# blocks into one "encoderblock" with a leading layer axis. Both run Flax's tanh-approximated GELU;
# vitlab's exact GELU differs from it by at most 1e-3 per activation.
_GOOGLE_PREFIXES = ("opt/target/", "params/")
_GOOGLE_POS_EMBED = ("pos_embedding", "Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding")
_GOOGLE_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(\w+?)_(\d+)/(.+)$")


def _take(arrays: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Remove and return one array, or say which one the checkpoint lacks."""
    if key not in arrays:
        raise VitlabError(f"the Google ViT checkpoint lacks the array {key!r}; is it a ViT checkpoint?")
    return arrays.pop(key)


def _dense(arrays: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """A Flax Dense layer (kernel: in × out) as torch Linear weight and bias."""
    return {"weight": _take(arrays, f"{key}/kernel").T, "bias": _take(arrays, f"{key}/bias")}


def _norm(arrays: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """A Flax LayerNorm (scale, bias) as torch LayerNorm weight and bias."""
    return {"weight": _take(arrays, f"{key}/scale"), "bias": _take(arrays, f"{key}/bias")}


def _unscan(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """big_vision's scanned encoder (one `encoderblock`, layer axis first) as numbered blocks."""
    out = {}
    for key, value in arrays.items():
        if key.startswith("Transformer/encoderblock/"):
            rest = key.removeprefix("Transformer/encoderblock/")
            out |= {f"Transformer/encoderblock_{i}/{rest}": layer for i, layer in enumerate(value)}
        else:
            out[key] = value
    return out


def filter_google_vit(arrays: dict[str, np.ndarray], num_heads: int) -> dict[str, torch.Tensor]:
    """A Google ViT `.npz` (original ViT or big_vision layout) as a vitlab / timm-named state dict.

    Only the model's arrays are read where a prefix marks them (not a trainer's optimizer state); arrays
    with no vitlab counterpart (a MAP head, say) are passed through under their own names, so that
    loading lists them.
    """
    prefix = next((p for p in _GOOGLE_PREFIXES if any(k.startswith(p) for k in arrays)), "")
    a = _unscan({
        k.removeprefix(prefix): torch.from_numpy(np.asarray(v, dtype=np.float32))
        for k, v in arrays.items() if k.startswith(prefix)
    })  # fmt: skip
    sd: dict[str, torch.Tensor] = {}
    if "embedding/kernel" in a:
        sd["patch_embed.proj.weight"] = rearrange(a.pop("embedding/kernel"), "p q c d -> d c p q")
        sd["patch_embed.proj.bias"] = _take(a, "embedding/bias")
    if "cls" in a:
        sd["cls_token"] = a.pop("cls")
    pos_key = next((k for k in _GOOGLE_POS_EMBED if k in a), None)
    if pos_key is not None:
        pos = a.pop(pos_key)
        if "cls_token" in sd and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
            pos = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)  # big_vision: the class token has none
        sd["pos_embed"] = pos
    blocks: dict[int, dict[str, set[tuple[int, str]]]] = {}  # block -> layer kind -> {(index, Flax module)}
    for key in a:
        if match := _GOOGLE_BLOCK.match(key):
            block, kind, index, _ = match.groups()
            module = f"Transformer/encoderblock_{block}/{kind}_{index}"
            blocks.setdefault(int(block), {}).setdefault(kind, set()).add((int(index), module))
    for block, kinds in sorted(blocks.items()):
        names = {
            kind: [module for _, module in sorted(kinds.get(kind, ()))]
            for kind in ("LayerNorm", "MultiHeadDotProductAttention", "MlpBlock")
        }
        if [len(v) for v in names.values()] != [2, 1, 1]:
            continue  # not a ViT encoder block: its arrays stay unconverted and are reported
        (norm1, norm2), (attn,), (mlp,) = names.values()
        heads = a[f"{attn}/query/kernel"].shape[1] if f"{attn}/query/kernel" in a else num_heads
        if heads != num_heads:
            raise VitlabError(f"the checkpoint's attention has {heads} heads, the model {num_heads}; set num_heads={heads}")
        p = f"blocks.{block}."
        # Flax keeps heads apart: q/k/v kernels (D, H, d), biases (H, d), out kernel (H, d, D).
        qkv = ("query", "key", "value")
        sd[p + "attn.qkv.weight"] = torch.cat([_take(a, f"{attn}/{n}/kernel").flatten(1).T for n in qkv])
        sd[p + "attn.qkv.bias"] = torch.cat([_take(a, f"{attn}/{n}/bias").flatten() for n in qkv])
        sd[p + "attn.proj.weight"] = _take(a, f"{attn}/out/kernel").flatten(0, 1).T
        sd[p + "attn.proj.bias"] = _take(a, f"{attn}/out/bias")
        for name, module in (("norm1", norm1), ("norm2", norm2)):
            sd |= {p + f"{name}.{k}": v for k, v in _norm(a, module).items()}
        for name, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            sd |= {p + f"mlp.{name}.{k}": v for k, v in _dense(a, f"{mlp}/{dense}").items()}
    if "Transformer/encoder_norm/scale" in a:
        sd |= {f"norm.{k}": v for k, v in _norm(a, "Transformer/encoder_norm").items()}
    for name, key in (("head", "head"), ("pre_logits.fc", "pre_logits")):
        if f"{key}/kernel" in a:
            sd |= {f"{name}.{k}": v for k, v in _dense(a, key).items()}
    return {**sd, **a}


def load_google_vit_checkpoint(model: VisionTransformer, path: str | Path) -> VisionTransformer:
    """Load an original Google ViT or big_vision `.npz` into a serial `model`, strictly."""
    if model.config["block"] != "serial":
        raise VitlabError("Google ViT checkpoints hold serial ViT blocks; build the model with block='serial' (vit-*)")
    load_state_dict_strict(model, filter_google_vit(read_npz(path), model.config["num_heads"]), str(path))
    return model


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """A (1, prefix + h·w, D) position embedding resampled bicubically to a `grid` of patches; prefix tokens kept."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise VitlabError(
            f"position embedding of {patches.shape[1]} patches (after {num_prefix_tokens} prefix token(s)) "
            "is not a square grid; is the number of prefix tokens right?"
        )
    if (side, side) == tuple(grid):
        return pos_embed
    image = rearrange(patches, "1 (h w) d -> 1 d h w", h=side).float()
    image = F.interpolate(image, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, rearrange(image, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)], dim=1)
