"""The ViT paper's hybrid (Dosovitskiy et al. 2021, Sec. 3.1): the feature map of a ResNet's first stages is the
patch grid of a ViT, each position a patch of size 1 projected to the width (timm's HybridEmbed names: backbone, proj).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.resnet import ResNetV2
from vitlab.models.vit import VisionTransformer


class HybridEmbed(nn.Module):
    """Images → tokens (B, grid², dim): a ResNet's last feature map, one token per position, by a 1×1 convolution."""

    def __init__(self, backbone: ResNetV2, img_size: int, dim: int):
        super().__init__()
        if img_size % backbone.stride:
            raise VitlabError(
                f"image size {img_size} is not divisible by the ResNet stem's stride {backbone.stride}; "
                f"use an image size that is a multiple of {backbone.stride}"
            )
        self.backbone = backbone
        self.img_size, self.patch_size, self.grid = img_size, backbone.stride, img_size // backbone.stride
        self.proj = nn.Conv2d(backbone.num_features, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise VitlabError(
                f"input is {tuple(x.shape[-2:])} pixels but the model was built for "
                f"{self.img_size}x{self.img_size}; resize the input or rebuild the model with img_size={x.shape[-1]}"
            )
        return rearrange(self.proj(self.backbone.forward_features(x)), "b d h w -> b (h w) d")


class HybridViT(VisionTransformer):
    """A VisionTransformer (either block family) on a ResNet stem; `patch_size` is the stem's stride.

    The stem is BiT's ResNet without its head, by default post-activation with TensorFlow's "SAME" padding as in the
    ViT paper's R50+ViT-B/16 (timm's vit_base_r50_s16_*: layers (3, 4, 9), preact=False, StdConv2dSame); every
    other keyword is the ViT's.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        stem_layers: Sequence[int] = (3, 4, 9),
        stem_channels: Sequence[int] = (256, 512, 1024),
        stem_width: int = 64,
        stem_preact: bool = False,
        stem_groups: int = 32,
        stem: str = "same",
        **options,
    ):
        # read by `make_patch_embed` during the ViT's construction, which builds each layer once and initialises once
        # (so that FSDP's sharded init, replaying the layers' constructors and one `reset_parameters`, is exact)
        self.stem_config = dict(
            stem_layers=list(stem_layers),
            stem_channels=list(stem_channels),
            stem_width=stem_width,
            stem_preact=stem_preact,
            stem_groups=stem_groups,
            stem=stem,
        )
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, **options)
        self.config |= self.stem_config

    def make_patch_embed(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> nn.Module:
        c = self.stem_config
        layers, channels = c["stem_layers"], c["stem_channels"]
        if len(layers) != len(channels):
            raise VitlabError(
                f"stem_channels={channels} gives {len(channels)} width(s) for a stem of {len(layers)} stage(s) "
                f"(units {layers}); give one width per stage"
            )
        backbone = ResNetV2(
            img_size, in_chans, 0, layers, channels, 1, c["stem_width"], c["stem"], c["stem_preact"], c["stem_groups"],
            zero_init_last=True,
        )  # fmt: skip
        if backbone.stride != patch_size:
            raise VitlabError(
                f"the ResNet stem of {len(layers)} stage(s) has stride {backbone.stride}, but patch_size={patch_size}; "
                f"set patch_size={backbone.stride} or give {len(layers)} stage(s) that reach it"
            )
        return HybridEmbed(backbone, img_size, dim)

    def reset_embeddings(self) -> None:
        """The ViT's embeddings, then the ResNet stem's own init over the ViT's trunc-normal(0.02): Kaiming (fan out)
        convolutions and each unit's last norm zero, as timm's hybrids get it (its ViT init calls the backbone's
        `init_weights()`, whose default zero-inits the last layers). With the ViT's init a 13-unit post-activation
        stage grew its activations with every unit and the hybrid did not learn (README, "ViT against ConvNets").
        Here rather than in `reset_parameters`, so that FSDP's sharded init replays it too."""
        super().reset_embeddings()
        self.patch_embed.backbone.reset_parameters()
