"""Loading foreign checkpoints into vitlab models: one filter function per source format."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.vit import VisionTransformer

# Wrappers that training scripts commonly put around a state dict in a .pth file.
_WRAPPER_KEYS = ("state_dict", "model", "module")


# The formats pretrained weights are read in (finetune.format); `auto` tells them apart by the path.
_SHOWN = 3  # tensors named in one error


def check_weights(
    tensors: dict[str, torch.Tensor], source: str, fix: str = "the file is damaged or its run diverged: use another checkpoint"
) -> None:
    """Refuse integer or boolean tensors (loading would cast them silently) and NaN or infinite values (`fix`), by name."""
    for problem, bad, hint in (
        (
            "are not floating point",
            [f"{k} ({v.dtype})" for k, v in tensors.items() if not v.is_floating_point()],
            "vitlab casts no weights: save them as floats, or use another checkpoint",
        ),
        (
            "hold NaN or infinite values",
            [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()],
            fix,
        ),
    ):
        if bad:
            more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
            raise VitlabError(f"{source}: tensor(s) {', '.join(bad[:_SHOWN])}{more} {problem}; {hint}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.pth`/`.pt`/`.bin` file (the latter read with weights_only=True), all finite floats."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as exc:  # a truncated or malformed file
            raise VitlabError(f"{path} is damaged ({str(exc)[:120]}); download or export it again") from None
        check_weights(tensors, str(path))
        return tensors
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
    check_weights(data, str(path))
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
        raise VitlabError(
            f"{source} does not fit the model; "
            + "; ".join(problems)
            + "; give the checkpoint of a model with these shapes, or set model.name and model.options to match it"
        )
    model.load_state_dict(state_dict)


def implied_tensors(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Tensors that timm and Hugging Face store but `model` computes: zero biases of its bias-free
    LayerNorms, and its fixed sin-cos position table."""
    implied = {
        f"{name}.bias": torch.zeros_like(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm) and module.weight is not None and module.bias is None
    }
    if not isinstance(model.pos_embed, nn.Parameter):
        implied["pos_embed"] = model.pos_embed.detach().clone()
    return implied


def drop_implied(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """`state_dict` without the tensors `model` computes itself, where they hold exactly those values."""
    implied = implied_tensors(model)
    return {
        k: v
        for k, v in state_dict.items()
        if not (k in implied and v.shape == implied[k].shape and torch.allclose(v.float(), implied[k].float()))
    }


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_blocks(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """The tensors outside `blocks.N.`, and each block's tensors under their names inside the block."""
    rest: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if match := _BLOCK_KEY.match(key):
            blocks.setdefault(int(match[1]), {})[match[2]] = value
        else:
            rest[key] = value
    return rest, blocks


def join_blocks(rest: dict[str, torch.Tensor], blocks: dict[int, dict[str, torch.Tensor]], prefix: str = "blocks.") -> dict:
    """`split_blocks` undone, with each block's tensors under `{prefix}N.`."""
    return {**rest, **{f"{prefix}{i}.{k}": v for i, block in sorted(blocks.items()) for k, v in block.items()}}


# timm's ParallelScalingBlock (timm/models/vision_transformer.py, the ViT-22B block, built with its default
# fuse_out_proj=False): in_norm; in_proj with rows [mlp, q, k, v] (vitlab: [q, k, v, mlp]) and, when
# qkv_bias, one bias over all of them, else mlp_bias alone; q_norm, k_norm; separate attn_out_proj and
# mlp_out_proj, each with a bias (vitlab fuses them into out_proj with one bias, their sum).
def parallel_block_to_timm(block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One vitlab ParallelBlock's tensors under timm's ParallelScalingBlock names."""
    b = dict(block)
    out = {k: b.pop(k) for k in list(b) if k.startswith(("q_norm.", "k_norm."))}
    out |= {f"in_{k}": b.pop(k) for k in list(b) if k.startswith("norm.")}
    dim = b["out_proj.weight"].shape[0]
    qkv, mlp = b.pop("in_proj.weight").split([3 * dim, b["mlp_bias"].shape[0]])
    out["in_proj.weight"] = torch.cat([mlp, qkv])
    mlp_bias, qkv_bias = b.pop("mlp_bias"), b.pop("qkv_bias", None)
    if qkv_bias is None:
        out["mlp_bias"] = mlp_bias
    else:
        out["in_proj.bias"] = torch.cat([mlp_bias, qkv_bias])
    attn_w, mlp_w = b.pop("out_proj.weight").split([dim, mlp.shape[0]], dim=1)
    # timm's one LayerScale gain acts on the sum of the branches: vitlab's per-branch gains go into the out projections
    gain_attn, gain_mlp = (b.pop(f"ls{i}.gamma", attn_w.new_ones(dim))[:, None] for i in (1, 2))
    out_bias = b.pop("out_proj.bias") * gain_attn[:, 0]
    out |= {
        "attn_out_proj.weight": attn_w * gain_attn,
        "attn_out_proj.bias": out_bias,
        "mlp_out_proj.weight": mlp_w * gain_mlp,
        "mlp_out_proj.bias": torch.zeros_like(out_bias),
    }
    return out | b  # anything left (a branch norm) keeps its name, so that timm lists it


def timm_block_to_parallel(block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One timm ParallelScalingBlock's tensors under vitlab's ParallelBlock names (`parallel_block_to_timm` undone)."""
    b = dict(block)
    out = {k: b.pop(k) for k in list(b) if k.startswith(("q_norm.", "k_norm."))}
    out |= {k.removeprefix("in_"): b.pop(k) for k in list(b) if k.startswith("in_norm.")}
    weight = b.pop("in_proj.weight")
    dim = weight.shape[1]
    mlp_dim = weight.shape[0] - 3 * dim
    mlp, qkv = weight.split([mlp_dim, 3 * dim])
    out["in_proj.weight"] = torch.cat([qkv, mlp])
    if "in_proj.bias" in b:
        out["mlp_bias"], out["qkv_bias"] = b.pop("in_proj.bias").split([mlp_dim, 3 * dim])
    elif "mlp_bias" in b:
        out["mlp_bias"] = b.pop("mlp_bias")
    if "attn_out_proj.weight" in b:
        out["out_proj.weight"] = torch.cat([b.pop("attn_out_proj.weight"), b.pop("mlp_out_proj.weight")], dim=1)
        out["out_proj.bias"] = b.pop("attn_out_proj.bias") + b.pop("mlp_out_proj.bias")
    if "ls.gamma" in b:  # timm's LayerScale on the sum of both branches, folded into the out projection
        gain = b.pop("ls.gamma")
        out |= {k: b.pop(k) for k in ("out_proj.weight", "out_proj.bias") if k in b}  # fused: not renamed above
        out["out_proj.weight"], out["out_proj.bias"] = out["out_proj.weight"] * gain[:, None], out["out_proj.bias"] * gain
    return out | b  # a fused out_proj (fuse_out_proj=True) already has vitlab's names


# timm's VisionTransformer (no_embed_class=False) orders its tokens [cls, registers, patches] and its pos_embed
# covers all of them; vitlab's registers come after the patches and have no position. The register rows of timm's
# pos_embed are zero on export, and added into reg_token on import: the same sums either way.
def registers_to_timm(rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors outside the blocks with zero position rows for the registers, after the class token."""
    if "reg_token" not in rest:
        return rest
    pos, prefix = rest["pos_embed"], int("cls_token" in rest)
    zeros = pos.new_zeros(1, rest["reg_token"].shape[1], pos.shape[-1])
    return rest | {"pos_embed": torch.cat([pos[:, :prefix], zeros, pos[:, prefix:]], dim=1)}


def registers_from_timm(rest: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """`registers_to_timm` undone: pos_embed's register rows into reg_token. It has them when it is not `model`'s
    length and the rows after the class token and the registers form a square grid (of any size: fine-tuning
    resamples it afterwards); timm's no_embed_class=True layout has none."""
    if "reg_token" not in rest or "pos_embed" not in rest:
        return rest
    pos, count, prefix = rest["pos_embed"], rest["reg_token"].shape[1], model.num_prefix_tokens
    patches = pos.shape[1] - prefix - count if pos.ndim == 3 else -1
    if pos.shape[1] == model.pos_embed.shape[1] or patches < 1 or math.isqrt(patches) ** 2 != patches:
        return rest
    rows = pos[:, prefix : prefix + count]
    return rest | {
        "reg_token": rest["reg_token"] + rows,
        "pos_embed": torch.cat([pos[:, :prefix], pos[:, prefix + count :]], dim=1),
    }


def to_timm(state_dict: dict[str, torch.Tensor], block: str) -> dict[str, torch.Tensor]:
    """A vitlab state dict under timm's names: serial blocks already have them, parallel ones are renamed."""
    rest, blocks = split_blocks(state_dict)
    if block == "parallel":
        blocks = {i: parallel_block_to_timm(b) for i, b in blocks.items()}
    return join_blocks(registers_to_timm(rest), blocks)


def filter_timm_vit(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """A timm VisionTransformer state dict (Block or ParallelScalingBlock) under `model`'s names (`to_timm` undone)."""
    rest, blocks = split_blocks(state_dict)
    held = {
        "serial" if "attn.qkv.weight" in b else "parallel"
        for b in blocks.values()
        if {"attn.qkv.weight", "in_proj.weight"} & set(b)
    }
    if held and held != {model.config["block"]}:
        found = " and ".join(sorted(held))
        raise VitlabError(
            f"the checkpoint holds {found} ViT blocks; build the model with block='{found}', not '{model.config['block']}'"
        )
    # Parallel blocks named by timm (in_norm, …) are renamed; ones saved by vitlab (norm, …) are already ours.
    # Their gains are in the out projections (`parallel_block_to_timm`), so a LayerScale model's start at one.
    gains = model.config["layer_scale"] and model.config["block"] == "parallel"
    for i, b in blocks.items():
        if "in_norm.weight" in b:
            blocks[i] = timm_block_to_parallel(b)
            if gains:
                ones = torch.ones_like(blocks[i]["out_proj.bias"])
                blocks[i] |= {"ls1.gamma": ones, "ls2.gamma": ones.clone()}
    return drop_implied(join_blocks(registers_from_timm(rest, model), blocks), model)


def load_timm_checkpoint(model: VisionTransformer, path: str | Path) -> VisionTransformer:
    """Load a timm-format ViT checkpoint (`.safetensors` or `.pth`) into `model`, strictly.

    vitlab's serial ViT uses timm's parameter names (cls_token, pos_embed, patch_embed.proj,
    blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, head), so the tensors map
    one to one (LayerScale's `ls1.gamma`, `ls2.gamma` and `reg_token` too); a parallel model reads timm's
    ParallelScalingBlock names (`filter_timm_vit`); anything else (fc_norm of timm's average-pool variant) is listed.
    """
    load_state_dict_strict(model, filter_timm_vit(read_state_dict(path), model), str(path))
    return model


# Hugging Face transformers' ViT (ViTForImageClassification and ViTModel as save_pretrained writes them and
# the Hub's google/vit-* checkpoints hold them), vitlab name → HF name. A block's fused qkv is split into
# attention.attention.{query,key,value}; ViTModel's pooler (dense + tanh on the class token) is vitlab's
# pre-logits layer.
HF_NAMES = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "pre_logits.fc.weight": "vit.pooler.dense.weight",
    "pre_logits.fc.bias": "vit.pooler.dense.bias",
    "head.weight": "classifier.weight",
    "head.bias": "classifier.bias",
}
HF_BLOCK_NAMES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
HF_QKV = ("query", "key", "value")
HF_BLOCKS = "vit.encoder.layer."


def to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A serial vitlab state dict under Hugging Face ViT names."""
    rest, blocks = split_blocks(state_dict)
    out = {HF_NAMES.get(k, k): v for k, v in rest.items()}
    for i, block in blocks.items():
        p = f"{HF_BLOCKS}{i}."
        for key, value in block.items():
            module, _, kind = key.rpartition(".")
            if module == "attn.qkv":
                out |= {f"{p}attention.attention.{n}.{kind}": t for n, t in zip(HF_QKV, value.chunk(3))}
            else:
                out[f"{p}{HF_BLOCK_NAMES.get(module, module)}.{kind}"] = value
    return out


def from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ViT state dict (with or without the `vit.` prefix of the classifier) under vitlab's names."""
    if not any(k.startswith("vit.") for k in state_dict):  # a ViTModel: no classifier around it
        state_dict = {f"vit.{k}": v for k, v in state_dict.items()}
    names = {hf: ours for ours, hf in HF_NAMES.items()}
    block_names = {hf: ours for ours, hf in HF_BLOCK_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not key.startswith(HF_BLOCKS):
            out[names.get(key, key)] = value
            continue
        index, _, rest = key.removeprefix(HF_BLOCKS).partition(".")
        module, _, kind = rest.rpartition(".")
        if module.startswith("attention.attention.") and module.rpartition(".")[2] in HF_QKV:
            qkv.setdefault((int(index), kind), {})[module.rpartition(".")[2]] = value
        else:
            out[f"blocks.{index}.{block_names.get(module, module)}.{kind}"] = value
    for (index, kind), parts in qkv.items():
        if set(parts) != set(HF_QKV):
            raise VitlabError(
                f"layer {index} of the Hugging Face checkpoint lacks attention {kind}s of {sorted(set(HF_QKV) - set(parts))}"
            )
        shapes = {n: tuple(parts[n].shape) for n in HF_QKV}
        if len(set(shapes.values())) > 1:
            raise VitlabError(
                f"the Hugging Face checkpoint's {HF_BLOCKS}{index}.attention.attention.{{query,key,value}}.{kind} "
                f"have unequal shapes {shapes}; it is damaged: download or export it again"
            )
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in HF_QKV])
    return out


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` is a folder with a Hugging Face config.json (`read_hf_folder` checks it)."""
    return os.path.lexists(Path(path) / "config.json")


def _hf_file(folder: Path, name: str) -> Path | None:
    """`folder/name` if it exists, refused when it is a broken link or a link leading outside the folder.

    The Hugging Face cache's snapshot folders (`…/snapshots/REVISION/`) link every file to `../../blobs/`: allowed.
    """
    path = folder / name
    if not os.path.lexists(path):
        return None
    target = path.resolve()
    if not target.is_file():
        raise VitlabError(f"{path} is a broken link or not a file; download the model folder again")
    homes = [folder.resolve()] + ([folder.parent.parent.resolve() / "blobs"] if folder.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(home) for home in homes):
        raise VitlabError(f"{path} is a link to {target}, outside {folder}; copy the file in")
    return path


def read_hf_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the tensors of a Hugging Face model folder (model.safetensors, else pytorch_model.bin)."""
    folder = Path(path)
    config_file = _hf_file(folder, "config.json")
    if config_file is None:
        raise VitlabError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VitlabError(f"cannot read {config_file} as JSON ({exc}); download or export the model folder again") from None
    if not isinstance(config, dict):
        raise VitlabError(
            f"{config_file} holds a JSON {type(config).__name__}, not the object of a model config; "
            "download or export the model folder again"
        )
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (weights_file := _hf_file(folder, name)) is not None:
            return config, read_state_dict(weights_file)
    if (folder / "model.safetensors.index.json").is_file():
        raise VitlabError(f"{folder} holds a sharded checkpoint; merge it into one model.safetensors first")
    raise VitlabError(f"{folder} has no model.safetensors or pytorch_model.bin")


def filter_hf_vit(config: dict, state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """A Hugging Face ViT checkpoint under `model`'s names, after checking what the tensors cannot show."""
    if config.get("model_type") != "vit":
        raise VitlabError(
            f"the Hugging Face checkpoint is a {config.get('model_type')!r} model (config.json's model_type); "
            "vitlab reads ViT checkpoints (model_type 'vit'): give a ViT's folder"
        )
    if model.config["block"] != "serial":
        raise VitlabError("Hugging Face ViT checkpoints hold serial ViT blocks; build the model with block='serial' (vit-*)")
    heads = config.get("num_attention_heads", model.config["num_heads"])
    if heads != model.config["num_heads"]:
        raise VitlabError(
            f"the checkpoint's attention has {heads} heads, the model {model.config['num_heads']}; set num_heads={heads}"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise VitlabError(f"the checkpoint's MLP uses {config['hidden_act']!r}; vitlab's uses the exact 'gelu'")
    return drop_implied(from_hf(state_dict), model)


def load_hf_checkpoint(model: VisionTransformer, path: str | Path) -> VisionTransformer:
    """Load a Hugging Face ViT folder (google/vit-base-patch16-224's layout) into a serial `model`, strictly.

    Hugging Face's ViT normalises with LayerNorm epsilon 1e-12 by default, vitlab with 1e-6; for activations
    of unit scale this changes the output by about 1e-6 relative.
    """
    config, state_dict = read_hf_folder(path)
    load_state_dict_strict(model, filter_hf_vit(config, state_dict, model), str(path))
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
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if k.startswith(prefix)}
    check_weights(tensors, "the Google ViT checkpoint")
    a = _unscan({k.removeprefix(prefix): v.float() for k, v in tensors.items()})
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


def fit_to_model(state_dict: dict[str, torch.Tensor], model: VisionTransformer, keep_head: bool) -> dict[str, torch.Tensor]:
    """Pretrained tensors made to fit `model`: position embedding resampled to its patch grid, head replaced.

    Unless `keep_head`, the pretrained head gives way to the model's own (fine-tuning makes that a zero one with
    `reset_head`), and a pretrained pre-logits layer the model has no place for is dropped. A model with `fc_norm`
    fed tensors without one drops the per-token final norm and keeps its own new `fc_norm` (MAE's fine-tuning).
    """
    own = model.state_dict()
    fitted = dict(state_dict)
    pos = fitted.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape and pos.ndim == 3 and len(pos) == 1:
        grid = (model.patch_embed.grid, model.patch_embed.grid)
        fitted["pos_embed"] = resample_pos_embed(fitted["pos_embed"], grid, model.num_prefix_tokens)
    if not keep_head:
        fitted = {k: v for k, v in fitted.items() if not k.startswith(("head.", "pre_logits.")) or k in own}
        fitted |= {k: v for k, v in own.items() if k.startswith("head.")}
    if "fc_norm.weight" in own and "fc_norm.weight" not in fitted:  # MAE's fine-tuning: a new norm after the pool
        fitted = {k: v for k, v in fitted.items() if not k.startswith("norm.")}
        fitted |= {k: v for k, v in own.items() if k.startswith("fc_norm.")}
    return fitted
