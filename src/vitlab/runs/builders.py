"""The networks of every kind of run, built from its config: classifier, generator, discriminator, pretraining wrapper."""

from __future__ import annotations

from torch import nn

from vitlab.config import DiscriminatorConfig, GeneratorConfig, PretrainConfig, RunConfig
from vitlab.models.ai602 import Ai602Discriminator
from vitlab.models.gan import PatchDiscriminator, ResnetGenerator
from vitlab.models.masked import build_pretrainer
from vitlab.models.presets import create_model
from vitlab.models.unet import create_unet
from vitlab.models.vit import VisionTransformer


def build_model(config: RunConfig, image_size: int, num_classes: int) -> VisionTransformer:
    """The run's model from its config and the data's geometry."""
    options = dict(config.model.options)
    if config.train.grad_penalty and options.get("attn_impl", "auto") == "auto":
        options["attn_impl"] = "matmul"  # the penalty differentiates twice; SDPA's CPU kernel cannot
    return create_model(config.model.name, img_size=image_size, num_classes=num_classes, **options)


def build_generator(cfg: GeneratorConfig, image_size: int) -> nn.Module:
    """CycleGAN's ResNet generator (`resnet`) or a ViTUnet with the named backbone preset."""
    if cfg.name == "resnet":
        return ResnetGenerator(**cfg.options)
    return create_unet(cfg.name, img_size=image_size, **cfg.options)


def build_discriminator(d: DiscriminatorConfig) -> nn.Module:
    """CycleGAN's PatchGAN, or the paper code's small sigmoid discriminator (`kind: ai602`)."""
    if d.kind == "ai602":
        return Ai602Discriminator()
    return PatchDiscriminator(base_channels=d.base_channels, num_layers=d.num_layers, norm=d.norm)


def build_pretraining(config: PretrainConfig, image_size: int) -> nn.Module:
    """The method's module around a headless encoder built from `config.model`."""
    p = config.pretrain
    encoder = build_model(config, image_size, num_classes=0)
    if p.method == "mae":
        options = dict(
            decoder_dim=p.decoder_dim, decoder_depth=p.decoder_depth, decoder_heads=p.decoder_heads, norm_pix_loss=p.norm_pix_loss
        )
    else:
        options = dict(mean=tuple(config.data.mean), std=tuple(config.data.std))
    if p.mask_ratio is not None:
        options["mask_ratio"] = p.mask_ratio
    return build_pretrainer(p.method, encoder, **options)
