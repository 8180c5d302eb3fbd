"""Export a vitlab ViT for timm (named safetensors + `timm.create_model` arguments), Hugging Face transformers,
ONNX or torch.export (the model's own computation traced with a dynamic batch size, every option included).

For timm and Hugging Face, only what the target computes the same way is written; an option without an
equivalent is refused with the reason. A weight that is NaN or infinite is refused for every format. The
tensor names come from `vitlab.models.weights`, which reads the same formats back; the preprocessing written
beside the model (mean, std, crop, resampling) is the run's own (`run_preprocessing`).

Nothing is overwritten by surprise: the export goes to a new or empty folder, staged beside it under a temporary
name and renamed into place; `force` replaces an earlier export (a folder holding export files only). `vitlab.runs.export`
also refuses a folder inside a run directory unless `force`, and inside its checkpoints/ always, so a run's own
files are never written to.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitlab.config import DataConfig
from vitlab.errors import VitlabError, check_choice
from vitlab.models.hybrid import HybridViT
from vitlab.models.resnet import ResNetV2
from vitlab.models.vit import VisionTransformer
from vitlab.models.weights import check_weights, implied_tensors, to_hf, to_timm

FORMATS = ("timm", "hf", "onnx", "torch-export")
TRACED = ("onnx", "torch-export")  # the model's own forward as a graph: no option to map, none refused
EXPORT_FILES = (
    *("model.safetensors", "create_model.json", "class_names.json", "config.json", "preprocessor_config.json"),
    *("model.onnx", "model.onnx.data", "model.pt2", "preprocessing.json", "README.md"),
)
_DISK_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def unsupported(config: dict, fmt: str) -> list[str]:
    """The model options that `fmt` has no equivalent for, each with the reason."""
    problems = []
    if config["num_classes"] <= 0:
        problems.append("num_classes=0 (no head): export a classifier")
    if fmt in TRACED:
        return problems
    traced = "export --format onnx or torch-export"
    if config["head"] == "mlp":
        problems.append(f"head='mlp' (the pre-logits layer): the exported classifier has a linear head only ({traced})")
    if config["block"] == "parallel" and config["branch_norm"] != "none":
        problems.append(f"branch_norm={config['branch_norm']!r}: timm's ParallelScalingBlock has no branch LayerNorm ({traced})")
    if fmt == "hf":
        serial_vit = [
            problem
            for bad, problem in (
                (
                    config["block"] == "parallel",
                    "block='parallel' (the ViT-22B-style block): transformers' ViT has serial blocks only",
                ),
                (config["qk_norm"], "qk_norm=True: transformers' ViT has no QK LayerNorm"),
                (config["pool"] != "cls", "pool='gap': ViTForImageClassification classifies the class token"),
                (config["layer_scale"], "layer_scale: transformers' ViT has no LayerScale"),
                (config["num_registers"], "num_registers: transformers' ViT has no register tokens"),
            )
            if bad
        ]
        if serial_vit:
            carry = "it" if len(serial_vit) == 1 else "them"
            problems += [*serial_vit[:-1], f"{serial_vit[-1]} (--format onnx, torch-export and timm carry {carry})"]
    if fmt == "timm" and int(config["mlp_dim"] / config["embed_dim"] * config["embed_dim"]) != config["mlp_dim"]:
        problems.append(f"mlp_dim={config['mlp_dim']}: timm's mlp_ratio cannot express it for embed_dim={config['embed_dim']}")
    return problems


# timm's registered BiT ResNets and ResNet hybrids (timm/models/resnetv2.py, vision_transformer_hybrid.py): their
# builders fix the ResNet's layout, so a vitlab ResNet or hybrid exports for timm only in one of these layouts.
TIMM_BIT = {
    ((3, 4, 6, 3), 1): "resnetv2_50x1_bit",
    ((3, 4, 6, 3), 3): "resnetv2_50x3_bit",
    ((3, 4, 23, 3), 1): "resnetv2_101x1_bit",
    ((3, 4, 23, 3), 3): "resnetv2_101x3_bit",
    ((3, 8, 36, 3), 2): "resnetv2_152x2_bit",
    ((3, 8, 36, 3), 4): "resnetv2_152x4_bit",
}
TIMM_HYBRIDS = {(3, 4, 9): "vit_base_r50_s16_224", (2, 2, 2, 2): "vit_small_r26_s32_224", (3, 4, 6, 3): "vit_large_r50_s32_224"}
TIMM_BIT_FIXED = dict(channels=[256, 512, 1024, 2048], stem_width=64, stem="bit", preact=True, groups=32)
TIMM_HYBRID_FIXED = dict(stem_width=64, stem="same", stem_preact=False, stem_groups=32, block="serial")


def timm_convnet(model: torch.nn.Module) -> tuple[str | None, list[str]]:
    """timm's registered name for a ResNetV2 or HybridViT's layout, and the options that keep it from having one."""
    c = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
    if isinstance(model, HybridViT):
        name = TIMM_HYBRIDS.get(tuple(c["stem_layers"]))
        fixed = TIMM_HYBRID_FIXED | dict(stem_channels=TIMM_BIT_FIXED["channels"][: len(c["stem_layers"])])
        layout = f"stem_layers={c['stem_layers']}: timm's hybrids have {' or '.join(map(str, map(list, TIMM_HYBRIDS)))}"
    else:
        name, fixed = TIMM_BIT.get((tuple(c["layers"]), c["width_factor"])), TIMM_BIT_FIXED
        layout = f"layers={c['layers']} at width {c['width_factor']}: timm registers {', '.join(TIMM_BIT.values())}"
    problems = [f"{key}={c[key]!r}: timm's builder fixes {value!r}" for key, value in fixed.items() if c[key] != value]
    return name, problems + ([layout] if name is None else [])


def finite_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as floats, those timm and Hugging Face store but vitlab computes included; all finite."""
    implied = implied_tensors(model) if isinstance(model, VisionTransformer) else {}
    tensors = {k: v.detach().float() for k, v in {**model.state_dict(), **implied}.items()}
    check_weights(tensors, "cannot export the model", "its run diverged or started from them: export an earlier checkpoint")
    return tensors


def exported_state_dict(model: torch.nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    """The model's tensors under `fmt`'s names (`finite_tensors`); a ResNetV2's are timm's already."""
    tensors = finite_tensors(model)
    if not isinstance(model, VisionTransformer):
        named = tensors
    else:
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
        reg_tokens=c["num_registers"],
        # timm's serial Block has vitlab's ls1, ls2; its ParallelScalingBlock one gain on the sum, so there the
        # gains are folded into the out projections (`parallel_block_to_timm`) and timm builds none.
        init_values=(c["layer_scale"] or None) if c["block"] == "serial" else None,
        pretrained_cfg_overlay=timm_preprocessing(c, preprocessing),
    )
    if c["block"] == "parallel":
        args |= dict(norm_layer="layernorm", pre_norm=False, no_embed_class=False)  # timm's LayerNorm: eps 1e-6
    return args


def timm_preprocessing(config: dict, preprocessing: Preprocessing) -> dict:
    """timm's pretrained_cfg entries of the input: size, resampling, crop, mean and std (and the classes)."""
    mean, std = preprocessing.per_channel(config["in_chans"])
    return dict(
        input_size=[config["in_chans"], config["img_size"], config["img_size"]],
        interpolation=preprocessing.interpolation,
        crop_pct=preprocessing.crop_fraction or 1.0,
        crop_mode="squash" if preprocessing.crop_fraction is None else "center",
        mean=mean,
        std=std,
        num_classes=config["num_classes"],
    )


def timm_convnet_arguments(model: torch.nn.Module, name: str, preprocessing: Preprocessing) -> dict:
    """`timm.create_model` arguments of a ResNetV2 (timm's registered BiT of its layout) or a hybrid (a patch of 1
    on the ResNet's feature map; the ViT's keywords override timm's registered hybrid of its stem)."""
    c = model.config
    if isinstance(model, HybridViT):
        return timm_arguments(c, preprocessing) | dict(model_name=name, patch_size=1)
    overlay = timm_preprocessing(c, preprocessing)
    return dict(
        model_name=name,
        num_classes=c["num_classes"],
        in_chans=c["in_chans"],
        drop_path_rate=c["drop_path"],
        pretrained_cfg_overlay=overlay,
    )


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


def preprocessing_document(config: dict, preprocessing: Preprocessing) -> dict:
    """preprocessing.json beside an ONNX or torch.export model: how an RGB image becomes its float32 (batch, C, S, S) input."""
    mean, std = preprocessing.per_channel(config["in_chans"])
    return {
        "image_size": config["img_size"],
        "in_chans": config["in_chans"],
        "crop_fraction": preprocessing.crop_fraction,  # null: the whole image resized to the square
        "interpolation": preprocessing.interpolation,
        "rescale_factor": 1 / 255,
        "mean": mean,
        "std": std,
    }


def traced_writer(model: torch.nn.Module, fmt: str) -> Callable[[Path], object]:
    """A writer of `model`'s eval-mode forward into a folder, traced by torch.export with a dynamic batch size:
    model.pt2 (`torch.export.save`) or model.onnx (the dynamo ONNX exporter, input `pixel_values`, output `logits`)."""
    if fmt == "onnx":
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise VitlabError(
                f"--format onnx needs {' and '.join(missing)}: pip install 'vitlab[onnx]' (or pip install onnx onnxscript)"
            )
    c, param = model.config, next(model.parameters())
    # A batch of 2: torch.export specialises a dimension of size 1 to the constant 1.
    example = torch.zeros(2, c["in_chans"], c["img_size"], c["img_size"], dtype=param.dtype, device=param.device)
    training = model.training
    try:
        with _quiet():
            program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    finally:
        model.train(training)
    if fmt == "torch-export":
        return lambda folder: torch.export.save(program, folder / "model.pt2")
    with _quiet():
        onnx = torch.onnx.export(program, dynamo=True, input_names=["pixel_values"], output_names=["logits"], verbose=False)
    return lambda folder: onnx.save(folder / "model.onnx")  # weights in model.onnx.data beside it past ONNX's 2 GB


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep torch's deprecation warnings and the exporters' notes (torchvision ops not registered, constants not
    folded) off the console while tracing: none is the user's to act on."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


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
    card: str | None = None,
) -> list[Path]:
    """Write `model`, with the `preprocessing` of its inputs (and a model `card` as README.md), to the folder `out`
    for timm, Hugging Face, ONNX or torch.export; returns the files."""
    check_choice("--format", fmt, FORMATS)
    config = model.config
    convnet, problems = isinstance(model, (ResNetV2, HybridViT)), []
    if convnet:
        timm_name, layout = timm_convnet(model)
        problems += layout if fmt == "timm" else []  # ONNX and torch.export trace any layout
        problems += [f"{type(model).__name__}: transformers' ViT has none (export --format timm)"] if fmt == "hf" else []
        problems += [] if config["num_classes"] > 0 else ["num_classes=0 (no head): export a classifier"]
    if isinstance(model, VisionTransformer):
        problems += unsupported(config, fmt)
    if problems:
        raise VitlabError(f"cannot export this model for {fmt}: " + "; ".join(problems))
    classes = classes or [f"class {i}" for i in range(config["num_classes"])]
    with _disk_errors(out):
        target = export_target(out, force)  # before tracing, which takes a while
    if fmt in TRACED:
        finite_tensors(model)
        write_model = traced_writer(model, fmt)
        documents = {"class_names.json": classes, "preprocessing.json": preprocessing_document(config, preprocessing)}
    else:
        tensors = exported_state_dict(model, fmt)

        def write_model(folder: Path) -> None:
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

        if fmt == "timm":
            arguments = (
                timm_convnet_arguments(model, timm_name, preprocessing) if convnet else timm_arguments(config, preprocessing)
            )
            documents = {"create_model.json": arguments, "class_names.json": classes}
        else:
            documents = {
                "config.json": hf_config(config, classes),
                "preprocessor_config.json": hf_preprocessor_config(config, preprocessing),
            }
    texts = {name: json.dumps(document, indent=2) + "\n" for name, document in documents.items()}
    if card is not None:
        texts["README.md"] = card
    with _disk_errors(out):
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            write_model(staging)
            written = sorted(p.name for p in staging.iterdir()) + list(texts)
            for name, text in texts.items():
                (staging / name).write_text(text)
            _publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [Path(out) / name for name in written]
