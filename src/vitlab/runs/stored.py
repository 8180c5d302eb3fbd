"""A trained run read back for evaluation and inference: its checkpoint, its config and its models."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vitlab.config import PretrainConfig, RunConfig, TranslateConfig, from_dict
from vitlab.errors import VitlabError
from vitlab.models.vit import VisionTransformer
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.builders import build_generator, build_model
from vitlab.runs.kinds import KINDS, run_command


def check_made_by(path: Path, config: dict, needed: str) -> None:
    """Refuse a run (or checkpoint) that `vitlab needed` did not make, naming the next step."""
    made_by = run_command(config)
    if made_by == needed:
        return
    if (made_by, needed) == ("pretrain", "train"):
        fix = f"fine-tune it into a classifier first with `vitlab finetune` (a config with finetune.checkpoint: {path})"
    else:
        uses = next(kind.uses for cls, kind in KINDS.items() if cls.KIND == made_by)
        fix = f"give a run made by `vitlab {needed}` (this one is for {uses})"
    raise VitlabError(f"{path} is another kind of run (made by `vitlab {made_by}`, not `vitlab {needed}`); {fix}")


def load_run(path: str | Path, cls: type = RunConfig) -> tuple[Path, RunConfig | TranslateConfig | PretrainConfig, dict]:
    """A run's checkpoint (from itself or its run directory), its config of kind `cls`, and its metadata."""
    checkpoint = ckpt.find_checkpoint(path)
    meta = ckpt.read_meta(checkpoint)
    check_made_by(checkpoint, meta.get("config", {}), cls.KIND)
    return checkpoint, from_dict(cls, meta["config"]).validate(), meta


def load_checkpoint_model(path: str | Path, ema: bool = False) -> tuple[VisionTransformer, RunConfig]:
    """A run's model with the weights of its last checkpoint (or of a checkpoint folder), and the run's config."""
    checkpoint, config, meta = load_run(path)
    model = build_model(config, config.data.image_size, meta["num_classes"])
    if ema and not (checkpoint / "ema.safetensors").is_file():
        raise VitlabError(f"{checkpoint} holds no EMA weights (the run had train.ema_decay unset)")
    ckpt.load_weights(checkpoint, model, "ema" if ema else "model")
    return model, config


def load_generators(
    checkpoint: Path, config: TranslateConfig, device: torch.device, names: tuple[str, ...] = ("g_a", "g_b")
) -> dict[str, nn.Module]:
    """The named generators of a checkpoint, with their weights, in eval mode."""
    generators = {}
    for name in names:
        generator = build_generator(config.generator, config.data.crop_size)
        ckpt.load_weights(checkpoint, generator, name)
        generators[name] = generator.to(device).eval()
    return generators
