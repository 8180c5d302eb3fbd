"""Experiment configuration: dataclasses loaded from YAML and validated once, at load time."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from vitlab.errors import (
    AT_LEAST_0,
    AT_LEAST_1,
    BELOW_1,
    FRACTION,
    POSITIVE,
    Range,
    VitlabError,
    brief,
    check_choice,
    check_range,
)

# The allowed values of the schema's choices; the modules that implement them import them from here.
DATASETS = ("builtin", "cifar10", "cifar100", "folder", "wds", "hf")  # wds: WebDataset shards, always streamed
PAIR_DATASETS = ("builtin", "folder")
PAIRING_NAMES = ("random", "index")  # CycleGAN's random pairing of A and B images, or A[i] with B[i]
PROTOCOLS = ("vitlab", "paper-table2")  # eval.protocol: vitlab's FID/KID per direction, or Table 2 as the code measured it
NORMS = ("instance", "none")
DISCRIMINATORS = ("patchgan", "ai602")  # ai602: the paper code's small sigmoid one (vitlab.models.ai602)
WEIGHT_FORMATS = ("auto", "vitlab", "timm", "npz", "hf")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")  # `cuda:N` names one GPU
STRATEGIES = ("single", "ddp", "fsdp")  # one process, DDP replicas, FSDP2 shards (vitlab.train.sharding)

OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)  # (0, 1)
DECAY = Range(0, 1, low_open=True)  # (0, 1]


def check_fields(section: str, config: object) -> None:
    """Check each number named in `config.RANGES` (each entry of a tuple); null, where a field allows it, is off."""
    for key, allowed in config.RANGES.items():
        allowed, hint = allowed if isinstance(allowed, tuple) else (allowed, "")
        value = getattr(config, key)
        if config.__dataclass_fields__[key].default is None:
            hint = hint or f"set {section}.{key} in that range, or to null"
        if value is None:
            continue
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, item in items:
            check_range(f"{section}.{key}" + ("" if i is None else f"[{i}]"), item, allowed, hint)


AUTO_RESUME = "auto"


def check_name(key: str, name: str) -> None:
    """Refuse a run name that is not one plain folder name (`../x` or `/x` would write outside out_dir)."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise VitlabError(f"{key} {brief(name)} must be one plain folder name (no /, \\ or ..); rename it, e.g. my-run")


@dataclass
class ModelConfig:
    """Which preset to build and which of its keywords to override (see `vitlab.create_model`)."""

    # The default run: a 6-layer, 128-wide ViT-22B-style model on 8-pixel patches of 32-pixel images.
    name: str = "vit22b-ti/8"
    options: dict = field(default_factory=lambda: dict(depth=6, embed_dim=128, num_heads=4, mlp_dim=512))

    def validate(self) -> None:
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
    # Per-channel normalisation on the [0, 1] scale, kept with the run for eval, inspect and predict.
    # 0.5/0.5 maps to [-1, 1] (big_vision); ImageNet's is mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225].
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # Streaming (vitlab.data.sources): auto streams shards and folders of images above 64 px, decoding
    # per image in `workers` DataLoader processes per rank, with Inception crops for training and a
    # centre crop of `crop_fraction` of the shorter side for evaluation.
    stream: bool | str = "auto"
    workers: int | str = "auto"  # auto: as many as the rank's CPUs and training shards allow, at most 8
    crop_scale: tuple[float, float] = (0.08, 1.0)  # Inception crop area (Szegedy et al. 2015)
    crop_fraction: float = 0.875  # evaluation: resize the shorter side to size / 0.875, cut the centre
    val_fraction: float = 0.0  # a minival held out of train, per class (big_vision's train[99%:] is 0.01)
    image_column: str | None = None  # hf only: the image column; null finds `image` or `img`
    label_column: str | None = None  # hf only: the label column; null finds `label`, `labels` or `fine_label`

    RANGES: ClassVar[dict] = dict(
        image_size=AT_LEAST_1,
        num_train=AT_LEAST_1,
        num_test=AT_LEAST_1,
        seed=AT_LEAST_0,
        mean=Range(),
        std=POSITIVE,
        crop_scale=Range(0, 1, low_open=True),
        crop_fraction=Range(0, 1, low_open=True),
        val_fraction=BELOW_1,
    )

    def validate(self) -> None:
        check_choice("data.name", self.name, DATASETS)
        check_fields("data", self)
        check_choice("data.stream", self.stream, ("auto", True, False))
        if self.workers != "auto" and (isinstance(self.workers, str) or self.workers < 0):
            raise VitlabError(f"data.workers={brief(self.workers)} must be auto or a count >= 0; set --set data.workers=auto")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise VitlabError(f"data.crop_scale={list(self.crop_scale)} must be [low, high] with low <= high")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise VitlabError(
                f"data.mean={list(self.mean)} and data.std={list(self.std)} must both have 1 or 3 entries (per channel)"
            )
        if self.name != "builtin" and not self.root:
            raise VitlabError(f"data.root is required for data.name={self.name!r}: the folder holding the dataset")


@dataclass
class AugmentConfig:
    """Batched augmentation on tensors. The paper's recipe: flips only."""

    crop_padding: int = 0  # random crop after zero padding by this many pixels; 0 disables
    resized_crop: bool = False  # in memory, the Inception crop of data.crop_scale of the area (streams always get it)
    hflip: bool = True
    vflip: bool | str = "auto"  # auto: on in memory (the paper flipped vertically too), off for streamed data
    flip_prob: float = 0.5  # per flip; the paper's code used 0.33
    randaugment_ops: int = 0  # 0 disables RandAugment
    randaugment_magnitude: int = 9
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    random_erasing: float = 0.0  # probability per image (DeiT: 0.25), on the normalised batch

    RANGES: ClassVar[dict] = dict(
        crop_padding=AT_LEAST_0,
        randaugment_ops=AT_LEAST_0,
        mixup_alpha=AT_LEAST_0,
        cutmix_alpha=AT_LEAST_0,
        randaugment_magnitude=Range(0, 10),
        random_erasing=FRACTION,
        flip_prob=FRACTION,
    )

    def validate(self) -> None:
        check_fields("augment", self)
        check_choice("augment.vflip", self.vflip, ("auto", True, False))
        if self.crop_padding and self.resized_crop:
            raise VitlabError("augment.crop_padding and augment.resized_crop are two crops; set one of them")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    decay_all: bool = False  # decay every parameter (the paper's code), not only weight matrices; see parameter_groups
    # AdamW only: decay by weight_decay·(LR schedule factor) per step, not by lr·weight_decay (Wortsman et al. 2023)
    independent_weight_decay: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8  # AdamW's ε (torch's default)
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set (the recipes' 10k steps)
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)  # multistep: fractions of training (the paper's)
    gamma: float = 0.5  # multistep decay factor
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    layer_decay: float | None = None  # layer-wise LR decay for fine-tuning (BEiT): layer l of L gets lr·decay^(L+1-l)

    RANGES: ClassVar[dict] = dict(
        lr=POSITIVE,
        weight_decay=AT_LEAST_0,
        betas=BELOW_1,
        eps=POSITIVE,
        momentum=BELOW_1,
        warmup_epochs=AT_LEAST_0,
        warmup_steps=AT_LEAST_0,
        milestones=(OPEN_UNIT, "milestones are fractions of training, e.g. [0.3, 0.6, 0.9]"),
        gamma=DECAY,
        min_lr_ratio=FRACTION,
        clip_grad_norm=POSITIVE,
        clip_grad_value=POSITIVE,
        layer_decay=DECAY,
    )

    def validate(self) -> None:
        check_choice("optim.name", self.name, ("adamw", "sgd"))
        check_choice("optim.schedule", self.schedule, ("cosine", "multistep", "constant"))
        check_fields("optim", self)
        if self.independent_weight_decay and self.name != "adamw":
            raise VitlabError(
                f"optim.independent_weight_decay needs optim.name=adamw, not {self.name!r}; use adamw or set it false"
            )


@dataclass
class RunSettings:
    """What the `train` section of every training loop has: length, batch, precision, device, seed, cadence, checkpoints."""

    epochs: float = 15
    batch_size: int = 128  # global: split evenly across torchrun ranks
    precision: str = "auto"  # auto: bf16 on GPUs >= 8.0 and AVX512-BF16/AMX CPUs, fp16 on 7.x GPUs, else fp32
    seed: int = 0
    eval_every_epochs: float = 1.0
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    device: str = "auto"
    resume: str | None = None  # auto: continue out_dir/name if it has a checkpoint, else start it

    RANGES: ClassVar[dict] = dict(
        epochs=POSITIVE,
        batch_size=AT_LEAST_1,
        seed=AT_LEAST_0,
        eval_every_epochs=POSITIVE,
        checkpoint_every_steps=AT_LEAST_1,
        keep_checkpoints=AT_LEAST_1,
        log_every_steps=AT_LEAST_1,
        max_bad_steps=AT_LEAST_1,
        threads=AT_LEAST_1,
    )

    def validate(self) -> None:
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.resume", self.resume, (None, AUTO_RESUME))
        check_choice("train.device", self.device.split(":")[0], DEVICES)
        check_fields("train", self)


@dataclass
class TrainConfig(RunSettings):
    """Length, batch, precision and bookkeeping of a classification run, and its stabilisers and strategy."""

    compile: bool = False
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    z_loss: float = 0.0  # weight of PaLM's z-loss on the logits (1e-4 in PaLM)
    grad_penalty: float = 0.0  # squared input-gradient norm: vitlab's reading of the paper's undefined "gradient penalty"
    strategy: str = "ddp"  # single, ddp (DDP under torchrun), fsdp (FSDP2 shards; vitlab.train.sharding)
    cpu_offload: bool = False  # fsdp only: sharded parameters, gradients and optimizer state in host memory
    accumulate_steps: int = 1  # micro-batches per step: batch_size stays the global batch the LR is set for
    # > 0: measure the test loss ℓ₀ at step 0, and stop the run as diverged after this many evaluations in a row
    # with a test loss above ℓ₀ (or non-finite); 0 never stops. The stability map's early stop.
    divergence_patience: int = 0

    RANGES: ClassVar[dict] = dict(
        RunSettings.RANGES,
        label_smoothing=BELOW_1,
        ema_decay=OPEN_UNIT,
        z_loss=AT_LEAST_0,
        grad_penalty=AT_LEAST_0,
        accumulate_steps=AT_LEAST_1,
        divergence_patience=AT_LEAST_0,
    )

    def validate(self) -> None:
        super().validate()
        check_choice("train.strategy", self.strategy, STRATEGIES)
        if self.strategy == "fsdp" and (self.ema_decay is not None or self.compile):
            raise VitlabError("train.ema_decay and train.compile are not supported with train.strategy=fsdp yet; unset them")
        if self.precision == "fp16" and self.strategy == "fsdp":
            raise VitlabError("train.precision=fp16 is not supported with train.strategy=fsdp yet; use bf16 (or ddp)")
        if self.cpu_offload and self.strategy != "fsdp":
            raise VitlabError("train.cpu_offload needs train.strategy=fsdp")


@dataclass
class FinetuneConfig:
    """Start from pretrained weights (ViT lecture): the head is replaced, the position embedding resampled."""

    checkpoint: str = ""  # a vitlab run or checkpoint folder, a timm .safetensors/.pth, or a Google ViT .npz
    format: str = "auto"  # auto: a folder whose config.json says model_type vit is hf, another folder a vitlab run, .npz Google's, else timm's
    keep_head: bool = False  # keep the pretrained head (same classes) instead of a new zero-initialised one
    freeze_backbone: bool = False  # train the head only: a linear probe of frozen features

    def validate(self) -> None:
        if not self.checkpoint:
            raise VitlabError("finetune.checkpoint is required: the pretrained weights to start from")
        check_choice("finetune.format", self.format, WEIGHT_FORMATS)


@dataclass
class LogConfig:
    """Where a run's metrics go besides CSV and TensorBoard."""

    wandb: bool = False  # also to Weights & Biases (pip install wandb; WANDB_MODE=offline works without an account)
    wandb_project: str = "vitlab"


@dataclass
class Experiment:
    """What every experiment config has: a name, where its runs go, and its sections, each validated on load."""

    name: str = "default"
    out_dir: str = "runs"
    kind: str = ""  # the command that runs it (KIND); written into every run's config.yaml, optional in a YAML file

    KIND: ClassVar[str] = "train"

    def __post_init__(self) -> None:
        self.kind = self.kind or self.KIND

    def validate(self):
        check_name("name", self.name)
        if self.kind != self.KIND:
            raise VitlabError(
                f"kind: {brief(str(self.kind))} is not a `vitlab {self.KIND}` config; run it with "
                f"`vitlab {self.kind}`, or remove the kind key"
            )
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

    def to_dict(self) -> dict:
        return to_plain(dataclasses.asdict(self))


@dataclass
class RunConfig(Experiment):
    """One classification experiment: everything needed to rerun it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = None  # null: train from scratch
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> RunConfig:
        super().validate()
        if self.finetune is not None and self.train.strategy == "fsdp":
            raise VitlabError("fine-tuning (a finetune section) with train.strategy=fsdp is not supported yet; use ddp or single")
        return self


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
            raise VitlabError(f"{key} must be a list, got {brief(value)}")
        args = typing.get_args(hint)
        item = args[0]
        if len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
            raise VitlabError(f"{key} must have 2 entries, got {brief(value)}")
        return tuple(coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise VitlabError(f"{key} must be a mapping, got {brief(value)}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 1e308:
            raise VitlabError(f"{key} is an integer too large for a float; use a number below 1e308")
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 1e4 steps
    if hint is bool and not isinstance(value, bool):
        raise VitlabError(f"{key} must be true or false, got {brief(value)}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise VitlabError(f"{key} must be {hint.__name__}, got {brief(value)}")
    return value


def from_dict(cls, data, prefix: str = ""):
    """Build dataclass `cls` from a mapping; an unknown key or a wrong type names the key."""
    if not isinstance(data, dict):
        raise VitlabError(f"{prefix or 'config'} must be a mapping, got {brief(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        where = f"{prefix}." if prefix else ""
        keys = ", ".join(where + str(k) for k in unknown)[:200]
        raise VitlabError(f"unknown config key(s) {keys}; allowed: {', '.join(names)}")
    values = {k: coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    return cls(**values)


class _OverDefaults(dict):
    """A dict-valued field or a section that `--set` reached into while the config left it out: merged over its default."""


def _field_hint(cls: type | None, name: str) -> object:
    """The type hint of field `name` of dataclass `cls`, or None when there is no such field."""
    return typing.get_type_hints(cls).get(name) if cls is not None and dataclasses.is_dataclass(cls) else None


def _dataclass_of(hint: object) -> type | None:
    """The dataclass a hint names, directly or as `X | None`."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((option for option in options if dataclasses.is_dataclass(option)), None)


def apply_overrides(data: dict, overrides: list[str], cls: type | None = None) -> dict:
    """Apply `key.sub=value` strings (values parsed as YAML) onto a nested mapping of dataclass `cls`.

    Reaching into a dict-valued field the mapping leaves out (`model.options.depth=2`) marks it to be
    merged over the field's default by `merge_defaults`; setting the field whole replaces it.
    """
    for item in overrides:
        if "=" not in item:
            raise VitlabError(f"--set {brief(item)} must look like key.sub=value, e.g. train.epochs=5")
        key, raw = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node, kind = data, cls
        for part in parents:
            hint = _field_hint(kind, part)
            if part not in node:
                node[part] = _OverDefaults() if hint is dict or _dataclass_of(hint) else {}
            node, kind = node[part], _dataclass_of(hint)
            if not isinstance(node, dict):
                raise VitlabError(f"--set {key}: {part} is not a section")
        node[leaf] = parse_yaml(raw, f"--set {key}")
    return data


def _dict_default(cls: type, name: str, section: dict) -> dict:
    """The default of dict field `name` of `cls` in `section`; default model options go with the default model only."""
    if cls is ModelConfig and section.get("name", ModelConfig.name) != ModelConfig.name:
        return {}  # another preset starts from its own sizes, not the default run's depth and width
    return next(f for f in dataclasses.fields(cls) if f.name == name).default_factory()


def merge_defaults(cls: type, data: dict) -> dict:
    """Fill the dict fields of a mapping of `cls`: left out, the default; reached into by `--set`, merged over it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = data.get(f.name)
        if hints[f.name] is dict and (f.name not in data or isinstance(value, _OverDefaults)):
            data[f.name] = {**_dict_default(cls, f.name, data), **(value or {})}
        elif isinstance(value, dict) and _dataclass_of(hints[f.name]):
            merge_defaults(_dataclass_of(hints[f.name]), value)
            factory = f.default_factory
            if (
                isinstance(value, _OverDefaults)
                and factory is not dataclasses.MISSING
                and dataclasses.is_dataclass(default := factory())
            ):
                for key, plain in to_plain(dataclasses.asdict(default)).items():  # e.g. pretraining's own augment defaults
                    value.setdefault(key, plain)
    return data


MAX_YAML_VALUES = 100_000  # values a YAML document may expand to through its aliases (a billion-laughs guard)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with numbers as people write them and aliases bounded."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise VitlabError(
                f"expands through its aliases (&name/*name) to more than {MAX_YAML_VALUES} values; write it out plainly"
            )
        return node


# YAML 1.1 wants a dot and a signed exponent (1.0e-4); YAML 1.2 and people also write 5e-4, 1e4, 1E-3.
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` becomes once its aliases are expanded; a node reached again costs its size again."""
    if id(node) not in sizes:
        sizes[id(node)] = MAX_YAML_VALUES + 1  # a node that contains itself is refused too
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = min(1 + sum(_expanded_size(child, sizes) for child in children), MAX_YAML_VALUES + 1)
    return sizes[id(node)]


def parse_yaml(text: str, where: str) -> object:
    """One YAML document as plain data; a syntax error or an alias bomb is a VitlabError naming `where`."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise VitlabError(f"{where} is not valid YAML: {exc.problem or exc.context}{at}") from exc
    except yaml.YAMLError as exc:
        raise VitlabError(f"{where} is not valid YAML: {' '.join(str(exc).split())[:200]}") from exc
    except RecursionError as exc:
        raise VitlabError(f"{where} is nested too deeply to be a config; flatten it") from exc
    except VitlabError as exc:
        raise VitlabError(f"{where} {exc}") from exc
    except ValueError as exc:  # a scalar Python cannot hold, e.g. an int of more than 4300 digits
        raise VitlabError(f"{where} holds a value Python cannot read ({brief(str(exc))}); shorten it") from exc


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = RunConfig):
    """Read a YAML config (or the defaults) of kind `cls`, apply `--set` overrides, validate."""
    data: object = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise VitlabError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise VitlabError(
                f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                f"{exc.start}); save it as UTF-8"
            ) from exc
        data = parse_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise VitlabError(f"config file {path} must be a mapping of sections (key: value), got {brief(data)}")
    return from_dict(cls, merge_defaults(cls, apply_overrides(data, list(overrides), cls))).validate()


# Image translation (paper §4): CycleGAN training of ViTUnet or the ResNet generator against a PatchGAN.
# Defaults are CycleGAN's (Zhu et al. 2017 and its code's options), which the paper followed.


@dataclass
class GeneratorConfig:
    """`resnet` (CycleGAN's CNN) or a ViTUnet backbone preset (`vit-s/32`, …), and keyword overrides."""

    name: str = "vit-s/32"
    options: dict = field(default_factory=dict)


@dataclass
class DiscriminatorConfig:
    """The PatchGAN: 3 stride-2 layers from 64 channels see 70×70 patches (pix2pix); or the paper code's."""

    kind: str = "patchgan"  # ai602: the paper's code's small sigmoid discriminator (vitlab.models.ai602)
    base_channels: int = 64  # patchgan only
    num_layers: int = 3  # patchgan only
    norm: str = "instance"  # patchgan only

    RANGES: ClassVar[dict] = dict(base_channels=AT_LEAST_1, num_layers=AT_LEAST_1)

    def validate(self) -> None:
        check_choice("discriminator.kind", self.kind, DISCRIMINATORS)
        check_choice("discriminator.norm", self.norm, NORMS)
        check_fields("discriminator", self)


@dataclass
class PairDataConfig:
    """Two domains: `builtin` (sepia ↔ cyanotype scenes, truth known) or a CycleGAN `folder`."""

    name: str = "builtin"
    root: str | None = None
    load_size: int = 286  # training images are resized to this, then cropped at random
    crop_size: int = 256
    hflip: bool = True
    pairing: str = "random"  # random: A shuffled, B drawn at random, epoch = max(|A|, |B|); index: A[i] with B[i], epoch = min
    num_train: int = 1000  # builtin only, per domain
    num_test: int = 200  # builtin only, per domain
    seed: int = 0  # builtin only
    builtin: dict = field(default_factory=dict)  # builtin only: vitlab.data.builtin.BuiltinDifficulty knobs

    RANGES: ClassVar[dict] = dict(
        load_size=AT_LEAST_1, crop_size=AT_LEAST_1, num_train=AT_LEAST_1, num_test=AT_LEAST_1, seed=AT_LEAST_0
    )

    def validate(self) -> None:
        check_choice("data.name", self.name, PAIR_DATASETS)
        check_choice("data.pairing", self.pairing, PAIRING_NAMES)
        check_fields("data", self)
        if self.name == "folder" and not self.root:
            raise VitlabError("data.root is required for data.name='folder': the folder holding trainA, trainB, testA, testB")
        if self.crop_size > self.load_size:
            raise VitlabError(f"data.crop_size={self.crop_size} must be at most data.load_size={self.load_size}; lower it")


@dataclass
class CycleLossConfig:
    """CycleGAN's objective: LSGAN, cycle loss λ both ways, identity loss, a pool of past fakes."""

    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # a fraction of lambda_cycle; 0 turns the identity loss off
    pool_size: int = 50

    RANGES: ClassVar[dict] = dict(lambda_cycle=AT_LEAST_0, lambda_identity=AT_LEAST_0, pool_size=AT_LEAST_0)

    def validate(self) -> None:
        check_fields("loss", self)


@dataclass
class GanOptimConfig:
    """Adam for the generators and for the discriminators."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)

    RANGES: ClassVar[dict] = dict(lr=POSITIVE, betas=BELOW_1)

    def validate(self) -> None:
        check_fields("optim", self)


@dataclass
class TranslateTrainConfig(RunSettings):
    """Length (constant LR, then linear decay to zero), batch, precision and bookkeeping of a CycleGAN run."""

    epochs: float = 100  # at constant LR
    batch_size: int = 1
    log_every_steps: int = 100
    checkpoint_every_steps: int = 1000
    eval_every_epochs: float = 10  # translation error against the truth (built-in pair only)
    decay_epochs: float = 100  # then linear decay to zero
    sample_every_epochs: float = 10  # sample grid PNG
    num_samples: int = 4  # rows of the sample grid

    RANGES: ClassVar[dict] = dict(
        RunSettings.RANGES, epochs=AT_LEAST_0, decay_epochs=AT_LEAST_0, sample_every_epochs=POSITIVE, num_samples=AT_LEAST_1
    )

    def validate(self) -> None:
        super().validate()
        if self.epochs + self.decay_epochs == 0:
            raise VitlabError("train.epochs=0 and train.decay_epochs=0 leave nothing to train; set one of them above 0")


@dataclass
class FidConfig:
    """Which features FID and KID use; see vitlab.eval.fid."""

    protocol: str = "vitlab"  # paper-table2: the paper's Table 2 as its code measured it (vitlab.eval.table2)
    features: str = "auto"  # auto, inception, inception-2048, inception-64, randconv, FILE.pt2 (torch.export), or module:callable
    inception_weights: str | None = None  # torch-fidelity's Inception file; needed by the inception features
    kid_subset_size: int = 1000  # capped at half the smaller image set, so that KID's spread over subsets means something
    batch_size: int = 50
    domain_names: tuple[str, str] = ("A", "B")  # paper-table2 column names, e.g. [Apple, Orange]

    RANGES: ClassVar[dict] = dict(kid_subset_size=Range(2), batch_size=AT_LEAST_1)

    def validate(self) -> None:
        check_choice("eval.protocol", self.protocol, PROTOCOLS)
        check_fields("eval", self)


@dataclass
class TranslateConfig(Experiment):
    """One image-translation experiment: everything needed to rerun it."""

    KIND: ClassVar[str] = "translate-train"

    name: str = "translate"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    loss: CycleLossConfig = field(default_factory=CycleLossConfig)
    optim: GanOptimConfig = field(default_factory=GanOptimConfig)
    train: TranslateTrainConfig = field(default_factory=TranslateTrainConfig)
    eval: FidConfig = field(default_factory=FidConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> TranslateConfig:
        super().validate()
        return self


def derived_run_config(base: dict, overrides: list[str], out_dir: Path, name: str) -> RunConfig:
    """The train config `base` with `overrides`, run as out_dir/name (a study's variant or a map's cell)."""
    # JSON quotes: `name=1e3` stays a string
    overrides = [*overrides, f"out_dir={json.dumps(str(out_dir))}", f"name={json.dumps(name)}"]
    return from_dict(RunConfig, merge_defaults(RunConfig, apply_overrides(copy.deepcopy(base), overrides, RunConfig))).validate()


@dataclass
class StabilityConfig(Experiment):
    """A stability study: one base train config, run once per variant with the same data and seed."""

    KIND: ClassVar[str] = "stability"

    name: str = "stability"
    threshold: float = 4000.0  # logits above this count as blown up and are drawn at it (paper Fig. 1)
    base: dict = field(default_factory=dict)  # a train config (the keys of RunConfig)
    variants: dict = field(default_factory=dict)  # variant name → list of `key.sub=value` overrides of base

    def variant_config(self, variant: str) -> RunConfig:
        """The full train config of one variant, written under out_dir/name/variant."""
        try:
            return derived_run_config(self.base, self.variants[variant], Path(self.out_dir) / self.name, str(variant))
        except VitlabError as exc:
            raise VitlabError(f"variants.{variant}: {exc}") from exc

    def validate(self) -> StabilityConfig:
        check_name("name", self.name)
        if self.kind != self.KIND:
            raise VitlabError(f"kind: {brief(str(self.kind))} is not a `vitlab stability` study; remove the kind key")
        check_range("threshold", self.threshold, POSITIVE)
        if not self.variants:
            raise VitlabError("variants is empty: name at least one variant, e.g. `plain: []`")
        for variant, overrides in self.variants.items():
            check_name("variant name", str(variant))
            if not isinstance(overrides, list):
                raise VitlabError(f"variants.{variant} must be a list of key.sub=value strings")
            self.variant_config(variant)
        return self


MAP_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # Wortsman et al. 2023's log grid, ~half a decade apart


@dataclass
class MapConfig(Experiment):
    """A stability map: one base train config, run once per cell (block, size, intervention, lr, seed)."""

    KIND: ClassVar[str] = "stability-map"

    name: str = "stability-map"
    base: dict = field(default_factory=dict)  # a train config (the keys of RunConfig)
    lrs: tuple[float, ...] = MAP_LRS  # peak learning rates (optim.lr)
    sizes: dict = field(default_factory=lambda: {"base": []})  # size name → `key.sub=value` overrides of base
    blocks: dict = field(
        default_factory=lambda: {"serial": ["model.options.block=serial"], "parallel": ["model.options.block=parallel"]}
    )
    interventions: dict = field(default_factory=lambda: {"none": []})
    seeds: tuple[int, ...] = (0,)
    patience: int = 3  # evaluations in a row with a test loss above ℓ₀ (or non-finite) that stop a cell as diverged
    trend_lr: float | None = None  # figure D's learning rate (one of lrs); None: the grid's middle one
    logit_threshold: float = 1.0e4  # figure D: the attention logit the fitted trend is extrapolated to

    @property
    def trend_learning_rate(self) -> float:
        """Figure D's learning rate: trend_lr, or the middle of the sorted grid."""
        return self.trend_lr if self.trend_lr is not None else sorted(self.lrs)[len(self.lrs) // 2]

    def cells(self) -> list[tuple[str, str, str, float, int]]:
        """Every (block, size, intervention, lr, seed), in the fixed order `--shard` counts in."""
        return list(itertools.product(self.blocks, self.sizes, self.interventions, self.lrs, self.seeds))

    def cell_config(self, block: str, size: str, intervention: str, lr: float, seed: int) -> RunConfig:
        """The train config of one cell, run as out_dir/name/<block>/<size>/<intervention>/lr<lr>-seed<seed>."""
        overrides = [
            *self.blocks[block],
            *self.sizes[size],
            *self.interventions[intervention],
            f"optim.lr={lr!r}",
            f"train.divergence_patience={self.patience}",
        ]
        group = Path(self.out_dir) / self.name / block / size / intervention  # nested: no two cells share a folder
        try:
            return derived_run_config(self.base, [*overrides, f"train.seed={seed}"], group, f"lr{lr:g}-seed{seed}")
        except VitlabError as exc:
            raise VitlabError(f"cell {block}/{size}/{intervention}: {exc}") from exc

    def validate(self) -> MapConfig:
        super().validate()
        if not self.lrs or not self.seeds:
            raise VitlabError("lrs and seeds must each name at least one value, e.g. lrs: [1.0e-3, 1.0e-2], seeds: [0]")
        if len({f"{lr:g}" for lr in self.lrs}) < len(self.lrs) or len(set(self.seeds)) < len(self.seeds):
            raise VitlabError("lrs and seeds must not repeat (LRs equal to 6 digits share a folder); drop the repeats")
        for lr in self.lrs:
            check_range("lrs[]", lr, POSITIVE)
        check_range("patience", self.patience, AT_LEAST_1)
        check_range("logit_threshold", self.logit_threshold, POSITIVE)
        if self.trend_lr is not None and self.trend_lr not in self.lrs:
            raise VitlabError(f"trend_lr {self.trend_lr:g} is not one of lrs; pick one of them or leave it null (the middle one)")
        for section in ("sizes", "blocks", "interventions"):
            entries = getattr(self, section)
            if not entries:
                raise VitlabError(f"{section} is empty: name at least one entry, e.g. `plain: []`")
            for entry, overrides in entries.items():
                check_name(f"{section} name", str(entry))
                if not isinstance(overrides, list):
                    raise VitlabError(f"{section}.{entry} must be a list of key.sub=value strings")
        for block, size, intervention in itertools.product(self.blocks, self.sizes, self.interventions):
            self.cell_config(block, size, intervention, self.lrs[0], self.seeds[0])
        return self


# Self-supervised pretraining (ViT lecture, "Self-supervision"): masked patch prediction (Dosovitskiy et al.
# 2021, App. B.1.2) or a masked autoencoder (He et al. 2022) on unlabeled images; see vitlab.train.pretrain.


@dataclass
class MaskedModelingConfig:
    """Which masked-image-modelling task and its settings; null ratios take the method's paper value."""

    method: str = "mae"  # mae (He et al. 2022) or mpp (Dosovitskiy et al. 2021)
    mask_ratio: float | None = None  # null: 0.75 for MAE, 0.5 for MPP (the papers')
    decoder_dim: int = 512  # MAE's decoder: 8 blocks of width 512, 16 heads (He et al. 2022, Table 1)
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # MAE: per-patch normalised pixel targets
    sample_every_steps: int = 500  # grid of original / masked / reconstruction (MAE Fig. 2)
    num_samples: int = 8

    def validate(self) -> None:
        check_choice("pretrain.method", self.method, ("mae", "mpp"))
        if self.mask_ratio is not None and not 0 < self.mask_ratio < 1:
            raise VitlabError(f"pretrain.mask_ratio={self.mask_ratio} must be in (0, 1), or null for the method's")
        if min(self.decoder_dim, self.decoder_depth, self.decoder_heads, self.sample_every_steps, self.num_samples) < 1:
            raise VitlabError(
                "pretrain.decoder_dim, decoder_depth, decoder_heads, sample_every_steps and num_samples must be >= 1"
            )
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise VitlabError(
                f"pretrain.decoder_dim={self.decoder_dim} must be divisible by 4 and by decoder_heads={self.decoder_heads}"
            )

    def check_patches(self, patches: int, geometry: str) -> None:
        """Refuse a geometry or mask ratio that masks none of the `patches` or keeps none (MAE and MPP mask round(n·ratio))."""
        if patches < 2:
            raise VitlabError(
                f"{geometry} is {patches} patch, and pretraining masks some patches and keeps others; "
                "raise data.image_size or choose a model with a smaller patch"
            )
        masked = round(patches * self.mask_ratio) if self.mask_ratio is not None else 1  # the papers' ratios fit any grid but 1x1
        if not 0 < masked < patches:
            raise VitlabError(
                f"pretrain.mask_ratio={self.mask_ratio:g} masks {masked} of the {patches} patches of {geometry}; "
                f"set it in [{1 / patches:.6g}, {1 - 1 / patches:.6g}] to mask some and keep some"
            )


@dataclass
class PretrainConfig(Experiment):
    """One pretraining experiment: the encoder, unlabeled images, the task and the run."""

    KIND: ClassVar[str] = "pretrain"

    name: str = "pretrain"
    pretrain: MaskedModelingConfig = field(default_factory=MaskedModelingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # labels are ignored
    # MAE's augmentation is crop and flip only (He et al. 2022, App. A.1).
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_padding=4, hflip=True, vflip=False))
    # MAE's optimiser: AdamW (0.9, 0.95), weight decay 0.05, cosine; its LR 1.5e-4·batch/256 is 2.4e-3 at batch 4096.
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1.5e-3, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=5)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, batch_size=256, strategy="single"))
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> PretrainConfig:
        super().validate()
        a = self.augment
        if a.randaugment_ops or a.mixup_alpha or a.cutmix_alpha or a.random_erasing:
            raise VitlabError(
                "augment: pretraining uses crop and flip only; set randaugment_ops, mixup_alpha, "
                "cutmix_alpha and random_erasing to 0"
            )
        if self.train.strategy == "fsdp" or self.train.ema_decay is not None or self.train.accumulate_steps != 1:
            raise VitlabError(
                "pretraining supports train.strategy single or ddp, without train.ema_decay and train.accumulate_steps"
            )
        classifier_only = {
            k: getattr(self.train, k) for k in ("label_smoothing", "z_loss", "grad_penalty") if getattr(self.train, k)
        }
        if classifier_only:
            keys = ", ".join(f"train.{k}={v:g}" for k, v in classifier_only.items())
            raise VitlabError(f"{keys}: a classifier's loss terms; pretraining has no logits to apply them to, so unset them")
        return self


def config_kind(keys) -> type:
    """The config class of a config (a YAML file's or a run's saved one): its `kind`, else told by its sections."""
    named = {cls.KIND: cls for cls in (RunConfig, PretrainConfig, TranslateConfig, StabilityConfig, MapConfig)}
    if keys.get("kind") in named:
        return named[keys["kind"]]
    if {"lrs", "sizes", "blocks", "interventions"} & set(keys):  # a map's grid, even with the default lrs
        return MapConfig
    if "variants" in keys:
        return StabilityConfig
    if "generator" in keys:
        return TranslateConfig
    return PretrainConfig if "pretrain" in keys else RunConfig
