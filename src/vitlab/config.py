"""Experiment configuration: dataclasses loaded from YAML and validated once, at load time."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vitlab.errors import VitlabError, check_choice
from vitlab.models.presets import model_options, preset_config


@dataclass
class ModelConfig:
    """Which preset to build and which of its keywords to override (see `vitlab.create_model`)."""

    name: str = "vit22b-ti/4"
    options: dict = field(default_factory=dict)

    def validate(self) -> None:
        preset_config(self.name)
        unknown = sorted(set(self.options) - set(model_options()) - {"img_size", "num_classes"})
        if unknown:
            raise VitlabError(f"model.options: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(model_options())}")
        for key in ("img_size", "num_classes"):
            if key in self.options:
                raise VitlabError(f"model.options.{key} is set by the data; use data.image_size or the dataset instead")


@dataclass
class DataConfig:
    """Dataset name, location and size; `builtin` needs no files."""

    name: str = "builtin"
    root: str | None = None
    download: bool = False
    image_size: int = 32
    num_train: int = 20000  # builtin only
    num_test: int = 2000  # builtin only
    seed: int = 0  # builtin only: which images are generated
    builtin: dict = field(default_factory=dict)  # builtin only: difficulty knobs (vitlab.data.builtin.BuiltinDifficulty)

    def validate(self) -> None:
        check_choice("data.name", self.name, ("builtin", "cifar10", "cifar100", "folder"))
        if self.name != "builtin" and not self.root:
            raise VitlabError(f"data.root is required for data.name={self.name!r}: the folder holding the dataset")


@dataclass
class AugmentConfig:
    """Batched augmentation on tensors. The paper's recipe: flips only."""

    crop_padding: int = 0  # random crop after zero padding by this many pixels; 0 disables
    hflip: bool = True
    vflip: bool = False  # the paper flipped vertically too
    randaugment_ops: int = 0  # 0 disables RandAugment
    randaugment_magnitude: int = 9
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)  # multistep: fractions of training (the paper's)
    gamma: float = 0.5  # multistep decay factor
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None

    def validate(self) -> None:
        check_choice("optim.name", self.name, ("adamw", "sgd"))
        check_choice("optim.schedule", self.schedule, ("cosine", "multistep", "constant"))
        if self.lr <= 0:
            raise VitlabError(f"optim.lr={self.lr} must be positive")
        if not all(0 < m < 1 for m in self.milestones):
            raise VitlabError(f"optim.milestones={list(self.milestones)} must be fractions of training in (0, 1)")


@dataclass
class TrainConfig:
    """Length, batch, precision and bookkeeping of a run."""

    epochs: float = 10
    batch_size: int = 128  # global: split evenly across torchrun ranks
    precision: str = "auto"  # auto: bf16 autocast where it is faster than fp32 (GPUs, AVX512-BF16 CPUs)
    compile: bool = False
    seed: int = 0
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    eval_every_epochs: float = 1.0
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    device: str = "auto"

    def validate(self) -> None:
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("train.device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        if self.epochs <= 0 or self.batch_size <= 0:
            raise VitlabError("train.epochs and train.batch_size must be positive")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise VitlabError(f"train.ema_decay={self.ema_decay} must be in (0, 1)")


@dataclass
class RunConfig:
    """One experiment: everything needed to rerun it."""

    name: str = "default"
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        for part in (self.model, self.data, self.optim, self.train):
            part.validate()
        return self

    def to_dict(self) -> dict:
        return to_plain(dataclasses.asdict(self))


def to_plain(value):
    """Tuples to lists, recursively, so the dict dumps as plain YAML."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def coerce(key: str, value, hint):
    """Check (and gently convert: int→float, list→tuple) one value against a type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(key, value, option)
            except VitlabError as exc:
                errors.append(str(exc))
        raise VitlabError(errors[0])
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise VitlabError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0]
        if len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
            raise VitlabError(f"{key} must have 2 entries, got {value!r}")
        return tuple(coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise VitlabError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise VitlabError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise VitlabError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, data, prefix: str = ""):
    """Build dataclass `cls` from a mapping; an unknown key or a wrong type names the key."""
    if not isinstance(data, dict):
        raise VitlabError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise VitlabError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; allowed: {', '.join(names)}")
    values = {k: coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    return cls(**values)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings (values parsed as YAML) onto a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise VitlabError(f"--set {item!r} must look like key.sub=value, e.g. train.epochs=5")
        key, raw = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise VitlabError(f"--set {key}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults), apply `--set` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise VitlabError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise VitlabError(f"{path} is not valid YAML: {exc}") from exc
    return from_dict(RunConfig, apply_overrides(data, list(overrides))).validate()
