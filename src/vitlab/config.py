"""Experiment configuration: dataclasses loaded from YAML and validated once, at load time."""

from __future__ import annotations

import copy
import math
import dataclasses
import inspect
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

    # The default run: a 6-layer, 128-wide ViT-22B-style model on 8-pixel patches of 32-pixel images.
    name: str = "vit22b-ti/8"
    options: dict = field(default_factory=lambda: dict(depth=6, embed_dim=128, num_heads=4, mlp_dim=512))

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
    # Per-channel normalisation on the [0, 1] scale, kept with the run for eval, inspect and predict.
    # 0.5/0.5 maps to [-1, 1] (big_vision); ImageNet's is mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225].
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def validate(self) -> None:
        check_choice("data.name", self.name, ("builtin", "cifar10", "cifar100", "folder"))
        for key, values in (("data.mean", self.mean), ("data.std", self.std)):
            if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
                raise VitlabError(f"data.{key[5:]}={list(values)} must be 1 or 3 finite numbers (per channel)")
        if not all(v > 0 for v in self.std):
            raise VitlabError(f"data.std={list(self.std)} must be positive")
        if self.name != "builtin" and not self.root:
            raise VitlabError(f"data.root is required for data.name={self.name!r}: the folder holding the dataset")


@dataclass
class AugmentConfig:
    """Batched augmentation on tensors. The paper's recipe: flips only."""

    crop_padding: int = 0  # random crop after zero padding by this many pixels; 0 disables
    hflip: bool = True
    vflip: bool = True  # the paper flipped vertically too
    randaugment_ops: int = 0  # 0 disables RandAugment
    randaugment_magnitude: int = 9
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)  # multistep: fractions of training (the paper's)
    gamma: float = 0.5  # multistep decay factor
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    layer_decay: float | None = None  # layer-wise LR decay for fine-tuning (BEiT): layer l of L gets lr·decay^(L+1-l)

    def validate(self) -> None:
        check_choice("optim.name", self.name, ("adamw", "sgd"))
        check_choice("optim.schedule", self.schedule, ("cosine", "multistep", "constant"))
        if self.lr <= 0:
            raise VitlabError(f"optim.lr={self.lr} must be positive")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise VitlabError(f"optim.layer_decay={self.layer_decay} must be in (0, 1], or null for none")
        if not all(0 < m < 1 for m in self.milestones):
            raise VitlabError(f"optim.milestones={list(self.milestones)} must be fractions of training in (0, 1)")


@dataclass
class TrainConfig:
    """Length, batch, precision and bookkeeping of a run."""

    epochs: float = 15
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
    z_loss: float = 0.0  # weight of PaLM's z-loss on the logits (1e-4 in PaLM)
    grad_penalty: float = 0.0  # weight of the squared input-gradient norm (double backpropagation)
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    device: str = "auto"
    strategy: str = "ddp"  # single, ddp (DDP under torchrun), fsdp (FSDP2 shards; vitlab.train.sharding)
    cpu_offload: bool = False  # fsdp only: sharded parameters, gradients and optimizer state in host memory
    resume: str | None = None  # auto: continue out_dir/name if it has a checkpoint, else start it
    accumulate_steps: int = 1  # micro-batches per step: batch_size stays the global batch the LR is set for

    def validate(self) -> None:
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("train.resume", self.resume, (None, "auto"))
        if self.accumulate_steps < 1:
            raise VitlabError(f"train.accumulate_steps={self.accumulate_steps} must be >= 1")
        check_choice("train.device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        check_choice("train.strategy", self.strategy, ("single", "ddp", "fsdp"))
        if self.epochs <= 0 or self.batch_size <= 0:
            raise VitlabError("train.epochs and train.batch_size must be positive")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise VitlabError(f"train.ema_decay={self.ema_decay} must be in (0, 1)")
        if self.strategy == "fsdp" and (self.ema_decay is not None or self.compile):
            raise VitlabError("train.ema_decay and train.compile are not supported with train.strategy=fsdp yet; unset them")
        if self.cpu_offload and self.strategy != "fsdp":
            raise VitlabError("train.cpu_offload needs train.strategy=fsdp")


@dataclass
class FinetuneConfig:
    """Start from pretrained weights (ViT lecture): the head is replaced, the position embedding resampled."""

    checkpoint: str = ""  # a vitlab run or checkpoint folder, a timm .safetensors/.pth, or a Google ViT .npz
    format: str = "auto"  # auto: a folder is a vitlab run, .npz Google's, anything else timm's
    keep_head: bool = False  # keep the pretrained head (same classes) instead of a new zero-initialised one
    freeze_backbone: bool = False  # train the head only: a linear probe of frozen features

    def validate(self) -> None:
        if not self.checkpoint:
            raise VitlabError("finetune.checkpoint is required: the pretrained weights to start from")
        check_choice("finetune.format", self.format, ("auto", "vitlab", "timm", "npz"))


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
    finetune: FinetuneConfig | None = None  # null: train from scratch

    def validate(self) -> RunConfig:
        for part in (self.model, self.data, self.optim, self.train, self.finetune):
            if part is not None:
                part.validate()
        if self.finetune is not None and self.train.strategy == "fsdp":
            raise VitlabError("fine-tuning (a finetune section) with train.strategy=fsdp is not supported yet; use ddp or single")
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


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = RunConfig):
    """Read a YAML config (or the defaults) of kind `cls`, apply `--set` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise VitlabError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise VitlabError(f"{path} is not valid YAML: {exc}") from exc
    return from_dict(cls, apply_overrides(data, list(overrides))).validate()


# Image translation (paper §4): CycleGAN training of ViTUnet or the ResNet generator against a PatchGAN.
# Defaults are CycleGAN's (Zhu et al. 2017 and its code's options), which the paper followed.


@dataclass
class GeneratorConfig:
    """`resnet` (CycleGAN's CNN) or a ViTUnet backbone preset (`vit-s/32`, …), and keyword overrides."""

    name: str = "vit-s/32"
    options: dict = field(default_factory=dict)

    def validate(self) -> None:
        from vitlab.models.gan import ResnetGenerator
        from vitlab.models.unet import unet_options

        if self.name == "resnet":
            allowed = list(inspect.signature(ResnetGenerator).parameters)
        else:
            preset_config(self.name)
            allowed = [k for k in unet_options() if k != "img_size"]
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise VitlabError(f"generator.options: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


@dataclass
class DiscriminatorConfig:
    """The PatchGAN: 3 stride-2 layers from 64 channels see 70×70 patches (pix2pix)."""

    base_channels: int = 64
    num_layers: int = 3
    norm: str = "instance"

    def validate(self) -> None:
        check_choice("discriminator.norm", self.norm, ("instance", "none"))
        if self.base_channels < 1 or self.num_layers < 1:
            raise VitlabError("discriminator.base_channels and discriminator.num_layers must be >= 1")


@dataclass
class PairDataConfig:
    """Two domains: `builtin` (sepia ↔ cyanotype scenes, truth known) or a CycleGAN `folder`."""

    name: str = "builtin"
    root: str | None = None
    load_size: int = 286  # training images are resized to this, then cropped at random
    crop_size: int = 256
    hflip: bool = True
    num_train: int = 1000  # builtin only, per domain
    num_test: int = 200  # builtin only, per domain
    seed: int = 0  # builtin only
    builtin: dict = field(default_factory=dict)  # builtin only: vitlab.data.builtin.BuiltinDifficulty knobs

    def validate(self) -> None:
        check_choice("data.name", self.name, ("builtin", "folder"))
        if self.name == "folder" and not self.root:
            raise VitlabError("data.root is required for data.name='folder': the folder holding trainA, trainB, testA, testB")
        if not 0 < self.crop_size <= self.load_size:
            raise VitlabError(f"data.crop_size={self.crop_size} must be positive and at most data.load_size={self.load_size}")


@dataclass
class CycleLossConfig:
    """CycleGAN's objective: LSGAN, cycle loss λ both ways, identity loss, a pool of past fakes."""

    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # a fraction of lambda_cycle; 0 turns the identity loss off
    pool_size: int = 50

    def validate(self) -> None:
        if self.lambda_cycle < 0 or self.lambda_identity < 0 or self.pool_size < 0:
            raise VitlabError("loss.lambda_cycle, loss.lambda_identity and loss.pool_size must be >= 0")


@dataclass
class GanOptimConfig:
    """Adam for the generators and for the discriminators."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)

    def validate(self) -> None:
        if self.lr <= 0:
            raise VitlabError(f"optim.lr={self.lr} must be positive")


@dataclass
class TranslateTrainConfig:
    """Length (constant LR, then linear decay to zero), batch, precision and bookkeeping."""

    epochs: float = 100  # at constant LR
    decay_epochs: float = 100  # then linear decay to zero
    batch_size: int = 1
    precision: str = "auto"
    seed: int = 0
    log_every_steps: int = 100
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2
    eval_every_epochs: float = 10  # translation error against the truth (built-in pair only)
    sample_every_epochs: float = 10  # sample grid PNG
    num_samples: int = 4  # rows of the sample grid
    max_bad_steps: int = 3
    threads: int | None = None
    device: str = "auto"
    resume: str | None = None  # auto: continue out_dir/name if it has a checkpoint, else start it

    def validate(self) -> None:
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("train.resume", self.resume, (None, "auto"))
        check_choice("train.device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        if self.epochs < 0 or self.decay_epochs < 0 or self.epochs + self.decay_epochs <= 0:
            raise VitlabError("train.epochs and train.decay_epochs must be >= 0, and not both 0")
        if self.batch_size <= 0 or self.eval_every_epochs <= 0 or self.sample_every_epochs <= 0:
            raise VitlabError("train.batch_size, train.eval_every_epochs and train.sample_every_epochs must be positive")


@dataclass
class FidConfig:
    """Which features FID and KID use; see vitlab.eval.fid."""

    features: str = "auto"  # auto, inception, inception-2048, inception-64, randconv, FILE.pt, or module:callable
    inception_weights: str | None = None  # torch-fidelity's Inception file; needed by the inception features
    kid_subset_size: int = 1000  # capped at the number of test images
    batch_size: int = 50

    def validate(self) -> None:
        if self.kid_subset_size < 2 or self.batch_size < 1:
            raise VitlabError("eval.kid_subset_size must be >= 2 and eval.batch_size >= 1")


@dataclass
class TranslateConfig:
    """One image-translation experiment: everything needed to rerun it."""

    name: str = "translate"
    out_dir: str = "runs"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    loss: CycleLossConfig = field(default_factory=CycleLossConfig)
    optim: GanOptimConfig = field(default_factory=GanOptimConfig)
    train: TranslateTrainConfig = field(default_factory=TranslateTrainConfig)
    eval: FidConfig = field(default_factory=FidConfig)

    def validate(self) -> TranslateConfig:
        for part in (self.generator, self.discriminator, self.data, self.loss, self.optim, self.train, self.eval):
            part.validate()
        return self

    def to_dict(self) -> dict:
        return to_plain(dataclasses.asdict(self))


@dataclass
class StabilityConfig:
    """A stability study: one base train config, run once per variant with the same data and seed."""

    name: str = "stability"
    out_dir: str = "runs"
    threshold: float = 4000.0  # logits above this count as blown up and are drawn at it (paper Fig. 1)
    base: dict = field(default_factory=dict)  # a train config (the keys of RunConfig)
    variants: dict = field(default_factory=dict)  # variant name → list of `key.sub=value` overrides of base

    def variant_config(self, variant: str) -> RunConfig:
        """The full train config of one variant, written under out_dir/name/variant."""
        overrides = [*self.variants[variant], f"out_dir={Path(self.out_dir) / self.name}", f"name={variant}"]
        try:
            return from_dict(RunConfig, apply_overrides(copy.deepcopy(self.base), overrides)).validate()
        except VitlabError as exc:
            raise VitlabError(f"variants.{variant}: {exc}") from exc

    def validate(self) -> StabilityConfig:
        if not self.variants:
            raise VitlabError("variants is empty: name at least one variant, e.g. `plain: []`")
        for variant, overrides in self.variants.items():
            if not isinstance(overrides, list):
                raise VitlabError(f"variants.{variant} must be a list of key.sub=value strings")
            self.variant_config(variant)
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
            raise VitlabError("pretrain.decoder_dim, decoder_depth, decoder_heads, sample_every_steps and num_samples must be >= 1")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise VitlabError(f"pretrain.decoder_dim={self.decoder_dim} must be divisible by 4 and by decoder_heads={self.decoder_heads}")


@dataclass
class PretrainConfig:
    """One pretraining experiment: the encoder, unlabeled images, the task and the run."""

    name: str = "pretrain"
    out_dir: str = "runs"
    pretrain: MaskedModelingConfig = field(default_factory=MaskedModelingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # labels are ignored
    # MAE's augmentation is crop and flip only (He et al. 2022, App. A.1).
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_padding=4, hflip=True, vflip=False))
    # MAE's optimiser: AdamW (0.9, 0.95), weight decay 0.05, cosine; its LR 1.5e-4·batch/256 is 2.4e-3 at batch 4096.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.5e-3, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=5))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, batch_size=256, strategy="single"))

    def validate(self) -> PretrainConfig:
        for part in (self.pretrain, self.model, self.data, self.optim, self.train):
            part.validate()
        a = self.augment
        if a.randaugment_ops or a.mixup_alpha or a.cutmix_alpha:
            raise VitlabError("augment: pretraining uses crop and flip only; set randaugment_ops, mixup_alpha and cutmix_alpha to 0")
        if self.train.strategy == "fsdp" or self.train.ema_decay is not None or self.train.accumulate_steps != 1:
            raise VitlabError("pretraining supports train.strategy single or ddp, without train.ema_decay and train.accumulate_steps")
        return self

    def to_dict(self) -> dict:
        return to_plain(dataclasses.asdict(self))
