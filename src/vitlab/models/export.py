"""Export a vitlab ViT for timm (named safetensors + `timm.create_model` arguments) or Hugging Face transformers.

Only what the target computes the same way is written; an option without an equivalent is refused with
the reason, and so is a weight that is NaN or infinite. The tensor names come from `vitlab.models.weights`,
which reads the same formats back; the preprocessing written beside them (mean, std, crop, resampling) is the
run's own (`run_preprocessing`).

Nothing is overwritten by surprise: the export goes to a new or empty folder, staged beside it under a temporary
name and renamed into place; `force` replaces an earlier export (a folder holding export files only). `vitlab.runs.export`
also refuses a folder inside a run directory unless `force`, and inside its checkpoints/ always, so a run's own
files are never written to.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitlab.config import DataConfig
from vitlab.errors import VitlabError, check_choice
from vitlab.models.weights import check_weights, implied_tensors, to_hf, to_timm

FORMATS = ("timm", "hf")
EXPORT_FILES = ("model.safetensors", "create_model.json", "class_names.json", "config.json", "preprocessor_config.json")
_DISK_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


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
    """The model's tensors, those the target stores but vitlab computes included, under `fmt`'s names; all finite."""
    tensors = {**model.state_dict(), **implied_tensors(model)}
    tensors = {k: v.detach().float() for k, v in tensors.items()}
    check_weights(tensors, "cannot export the model", "its run diverged or started from them: export an earlier checkpoint")
    named = to_timm(tensors, model.config["block"]) if fmt == "timm" else to_hf(tensors)
    return {k: v.contiguous().clone() for k, v in named.items()}  # split views would share storage


@dataclass(frozen=True)
class Preprocessing:
    """How images become the model's input: resized (and centre-cropped), then (x / 255 - mean) / std per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_fraction: float | None  # the centre square of this fraction of the shorter side; None: the whole image, squashed
    interpolation: str  # "bicubic" or "bilinear"

    def per_channel(self, channels: int) -> tuple[list[float], list[float]]:
        """Mean and std with one entry per channel."""
        return tuple([float(v) for v in values] * (channels if len(values) == 1 else 1) for values in (self.mean, self.std))


def run_preprocessing(data: DataConfig, streamed: bool) -> Preprocessing:
    """A run's evaluation preprocessing: a `streamed` run cuts the centre square of data.crop_fraction and resizes it
    bilinearly (`vitlab.data.stream.crops`); in memory, CIFAR is resized bilinearly and image folders bicubically, whole."""
    return Preprocessing(
        tuple(data.mean),
        tuple(data.std),
        data.crop_fraction if streamed else None,
        "bilinear" if streamed or data.name.startswith("cifar") else "bicubic",
    )


def timm_arguments(config: dict, preprocessing: Preprocessing) -> dict:
    """Keyword arguments of `timm.create_model` that build the same model (load the weights with checkpoint_path)."""
    c = config
    mean, std = preprocessing.per_channel(c["in_chans"])
    args = dict(
        # Any registered ViT name will do: every keyword below overrides its defaults. vit_base_patch16_xp_224 is
        # timm's ViT with ParallelScalingBlock (and RmsNorm, pre-norm and no class position, turned off here).
        model_name="vit_base_patch16_224" if c["block"] == "serial" else "vit_base_patch16_xp_224",
        img_size=c["img_size"],
        patch_size=c["patch_size"],
        in_chans=c["in_chans"],
        num_classes=c["num_classes"],
        embed_dim=c["embed_dim"],
        depth=c["depth"],
        num_heads=c["num_heads"],
        mlp_ratio=c["mlp_dim"] / c["embed_dim"],
        qkv_bias=c["qkv_bias"],
        qk_norm=c["qk_norm"],
        class_token=c["pool"] == "cls",
        global_pool="token" if c["pool"] == "cls" else "avg",
        fc_norm=c["fc_norm"],  # False: norm every token, then pool; True: pool, then norm
        pos_drop_rate=c["dropout"],
        proj_drop_rate=c["dropout"],
        attn_drop_rate=c["attn_dropout"],
        drop_path_rate=c["drop_path"],
        pretrained_cfg_overlay=dict(
            input_size=[c["in_chans"], c["img_size"], c["img_size"]],
            interpolation=preprocessing.interpolation,
            crop_pct=preprocessing.crop_fraction or 1.0,
            crop_mode="squash" if preprocessing.crop_fraction is None else "center",
            mean=mean,
            std=std,
            num_classes=c["num_classes"],
        ),
    )
    if c["block"] == "parallel":
        args |= dict(norm_layer="layernorm", pre_norm=False, no_embed_class=False)  # timm's LayerNorm: eps 1e-6
    return args


def hf_config(config: dict, classes: list[str]) -> dict:
    """config.json of a transformers ViTForImageClassification that computes what the vitlab model does."""
    c = config
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": c["embed_dim"],
        "num_hidden_layers": c["depth"],
        "num_attention_heads": c["num_heads"],
        "intermediate_size": c["mlp_dim"],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "hidden_dropout_prob": c["dropout"],
        "attention_probs_dropout_prob": c["attn_dropout"],
        "initializer_range": 0.02,
        "image_size": c["img_size"],
        "patch_size": c["patch_size"],
        "num_channels": c["in_chans"],
        "qkv_bias": c["qkv_bias"],
        "encoder_stride": c["patch_size"],
        "id2label": {str(i): name for i, name in enumerate(classes)},
        "label2id": {name: i for i, name in enumerate(classes)},
        "dtype": "float32",
    }


def hf_preprocessor_config(config: dict, preprocessing: Preprocessing) -> dict:
    """preprocessor_config.json: the resize, crop and normalisation as a transformers image processor.

    ViTImageProcessor squashes the whole image to the square; a centre crop is BitImageProcessor's (shorter side to
    size / crop_fraction, then the centre size x size).
    """
    size, crop = config["img_size"], preprocessing.crop_fraction
    mean, std = preprocessing.per_channel(config["in_chans"])
    common = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "resample": 2 if preprocessing.interpolation == "bilinear" else 3,  # PIL's codes
    }
    if crop is None:
        return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size}, **common}
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": int(size / crop)},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        **common,
    }


def export_target(out: str | Path, force: bool) -> Path:
    """The folder `out`, resolved, once it is safe to export to (see the module's docstring); else a VitlabError."""
    target = Path(out).resolve()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise VitlabError(f"{existing} is a file; give the folder to export to (it is created if missing)")
    held = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if held and not force:
        raise VitlabError(f"{out} is not empty; give a new or empty folder, or add --force to replace an earlier export there")
    others = [name for name in held if name not in EXPORT_FILES or (target / name).is_symlink() or not (target / name).is_file()]
    if others:
        raise VitlabError(
            f"{out} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, not an export's "
            "files; --force replaces an earlier export only: give a new or empty folder"
        )
    return target


def _publish(staging: Path, target: Path) -> None:
    """Rename the staged folder to `target`, swapping out (then deleting) an earlier export there."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = staging.with_suffix(".old")
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old)


@contextmanager
def _disk_errors(out: str | Path) -> Iterator[None]:
    """A forbidden path or a full disk met while exporting to `out` as a VitlabError that says what to do."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_ERRORS:
            raise
        fix = "free space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"fix the permissions of {exc.filename}"
        raise VitlabError(
            f"cannot write the export to {out} ({exc.filename}: {exc.strerror}); {fix}, or give another output folder"
        ) from None


def export_model(
    model: torch.nn.Module,
    fmt: str,
    out: str | Path,
    preprocessing: Preprocessing,
    classes: list[str] | None = None,
    force: bool = False,
) -> list[Path]:
    """Write `model`, with the `preprocessing` of its inputs, to the folder `out` for timm or Hugging Face; returns the files."""
    check_choice("--format", fmt, FORMATS)
    config = model.config
    problems = unsupported(config, fmt)
    if problems:
        raise VitlabError(f"cannot export this model for {fmt}: " + "; ".join(problems))
    tensors = exported_state_dict(model, fmt)
    classes = classes or [f"class {i}" for i in range(config["num_classes"])]
    if fmt == "timm":
        documents = {"create_model.json": timm_arguments(config, preprocessing), "class_names.json": classes}
    else:
        documents = {
            "config.json": hf_config(config, classes),
            "preprocessor_config.json": hf_preprocessor_config(config, preprocessing),
        }
    with _disk_errors(out):
        target = export_target(out, force)
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
            for name, document in documents.items():
                (staging / name).write_text(json.dumps(document, indent=2) + "\n")
            _publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [Path(out) / "model.safetensors", *(Path(out) / name for name in documents)]
