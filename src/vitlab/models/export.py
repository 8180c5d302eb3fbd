"""Export a vitlab ViT for timm (named safetensors + `timm.create_model` arguments) or Hugging Face transformers.

Only what the target computes the same way is written; an option without an equivalent is refused with
the reason. The tensor names come from `vitlab.models.weights`, which reads the same formats back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitlab.errors import VitlabError, check_choice
from vitlab.models.weights import implied_tensors, to_hf, to_timm

FORMATS = ("timm", "hf")
# vitlab's images enter the model as (x - 0.5) / 0.5 (`vitlab.data.augment.normalize`), resized bicubically.
MEAN, STD = 0.5, 0.5


def unsupported(config: dict, fmt: str) -> list[str]:
    """The model options that `fmt` has no equivalent for, each with the reason."""
    problems = []
    if config["num_classes"] <= 0:
        problems.append("num_classes=0 (no head): export a classifier")
    if config["head"] == "mlp":
        problems.append("head='mlp' (the pre-logits layer): the exported classifier has a linear head only")
    if config["block"] == "parallel" and config["branch_norm"] != "none":
        problems.append(f"branch_norm={config['branch_norm']!r}: timm's ParallelScalingBlock has no branch LayerNorm")
    if fmt == "hf":
        if config["block"] == "parallel":
            problems.append("block='parallel': transformers' ViT has serial blocks only (export --format timm)")
        if config["qk_norm"]:
            problems.append("qk_norm=True: transformers' ViT has no QK LayerNorm (export --format timm)")
        if config["pool"] != "cls":
            problems.append("pool='gap': ViTForImageClassification classifies the class token (export --format timm)")
    if fmt == "timm" and int(config["mlp_dim"] / config["embed_dim"] * config["embed_dim"]) != config["mlp_dim"]:
        problems.append(f"mlp_dim={config['mlp_dim']}: timm's mlp_ratio cannot express it for embed_dim={config['embed_dim']}")
    return problems


def exported_state_dict(model: torch.nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    """The model's tensors, those the target stores but vitlab computes included, under `fmt`'s names."""
    tensors = {**model.state_dict(), **implied_tensors(model)}
    tensors = {k: v.detach().float() for k, v in tensors.items()}
    named = to_timm(tensors, model.config["block"]) if fmt == "timm" else to_hf(tensors)
    return {k: v.contiguous().clone() for k, v in named.items()}  # split views would share storage


def timm_arguments(config: dict) -> dict:
    """Keyword arguments of `timm.create_model` that build the same model (load the weights with checkpoint_path)."""
    c = config
    args = dict(
        # Any registered ViT name will do: every keyword below overrides its defaults. vit_base_patch16_xp_224 is
        # timm's ViT with ParallelScalingBlock (and RmsNorm, pre-norm and no class position, turned off here).
        model_name="vit_base_patch16_224" if c["block"] == "serial" else "vit_base_patch16_xp_224",
        img_size=c["img_size"], patch_size=c["patch_size"], in_chans=c["in_chans"], num_classes=c["num_classes"],
        embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_dim"] / c["embed_dim"],
        qkv_bias=c["qkv_bias"], qk_norm=c["qk_norm"], class_token=c["pool"] == "cls",
        global_pool="token" if c["pool"] == "cls" else "avg", fc_norm=False,  # vitlab: norm every token, then pool
        pos_drop_rate=c["dropout"], proj_drop_rate=c["dropout"], attn_drop_rate=c["attn_dropout"],
        drop_path_rate=c["drop_path"],
        pretrained_cfg_overlay=dict(
            input_size=[c["in_chans"], c["img_size"], c["img_size"]], interpolation="bicubic", crop_pct=1.0,
            mean=[MEAN] * c["in_chans"], std=[STD] * c["in_chans"], num_classes=c["num_classes"],
        ),
    )  # fmt: skip
    if c["block"] == "parallel":
        args |= dict(norm_layer="layernorm", pre_norm=False, no_embed_class=False)  # timm's LayerNorm: eps 1e-6
    return args


def hf_config(config: dict, classes: list[str]) -> dict:
    """config.json of a transformers ViTForImageClassification that computes what the vitlab model does."""
    c = config
    return {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "hidden_size": c["embed_dim"], "num_hidden_layers": c["depth"], "num_attention_heads": c["num_heads"],
        "intermediate_size": c["mlp_dim"], "hidden_act": "gelu", "layer_norm_eps": 1e-6,
        "hidden_dropout_prob": c["dropout"], "attention_probs_dropout_prob": c["attn_dropout"],
        "initializer_range": 0.02, "image_size": c["img_size"], "patch_size": c["patch_size"],
        "num_channels": c["in_chans"], "qkv_bias": c["qkv_bias"], "encoder_stride": c["patch_size"],
        "id2label": {str(i): name for i, name in enumerate(classes)},
        "label2id": {name: i for i, name in enumerate(classes)}, "dtype": "float32",
    }  # fmt: skip


def hf_preprocessor_config(config: dict) -> dict:
    """preprocessor_config.json: transformers' ViTImageProcessor with vitlab's resize and normalisation."""
    size, channels = config["img_size"], config["in_chans"]
    return {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,  # 3: PIL's bicubic
        "image_mean": [MEAN] * channels, "image_std": [STD] * channels,
    }  # fmt: skip


def export_model(model: torch.nn.Module, fmt: str, out: str | Path, classes: list[str] | None = None) -> list[Path]:
    """Write `model` to the folder `out` for timm or Hugging Face; returns the files written."""
    check_choice("--format", fmt, FORMATS)
    config = model.config
    problems = unsupported(config, fmt)
    if problems:
        raise VitlabError(f"cannot export this model for {fmt}: " + "; ".join(problems))
    classes = classes or [f"class {i}" for i in range(config["num_classes"])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(exported_state_dict(model, fmt), out / "model.safetensors", metadata={"format": "pt"})
    if fmt == "timm":
        documents = {"create_model.json": timm_arguments(config), "class_names.json": classes}
    else:
        documents = {"config.json": hf_config(config, classes), "preprocessor_config.json": hf_preprocessor_config(config)}
    for name, document in documents.items():
        (out / name).write_text(json.dumps(document, indent=2) + "\n")
    return [out / "model.safetensors", *(out / name for name in documents)]


def export_run(run: str | Path, fmt: str, out: str | Path, ema: bool = False) -> list[Path]:
    """Export the model of a run's last checkpoint (or of a checkpoint folder), with its class names."""
    from vitlab.data.classes import class_names
    from vitlab.train import checkpoint as ckpt
    from vitlab.eval.runs import load_checkpoint_model

    model, config = load_checkpoint_model(run, ema)
    saved = ckpt.read_meta(ckpt.find_checkpoint(run)).get("classes")
    return export_model(model, fmt, out, class_names(config.data, model.num_classes, saved))
