"""ViTUnet (paper §4.1): a U-Net of transformer stages over token grids, un-patchified and refined by a CNN.

    patch embedding + learned position embedding                  token grid G×G
    encoder, `levels` times:  stage → keep as skip → 2×2 average   G → G/2 → …
    bottleneck stage                                              G / 2^levels
    decoder, `levels` times:  ×2 bilinear → concat skip, linear → stage
    LayerNorm → linear to pixels → un-patchify → residual CNN refinement → tanh

Each stage is `stage_depth` (depth / 6 by default) serial or parallel blocks; the default has one level:
a stage, downsampling, a stage, upsampling with the skip, a stage. This token-grid design is vitlab's own
reading of the paper's §4.1 (which does not say how it resamples): resampling acts on the token grid and
keeps the width. The paper's code ran another network, which interpolates the channel axis and stacks
its skips along the tokens: `Ai602ViTUnet` (vitlab.models.ai602), built for the `ai602-…` preset names.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.ai602 import Ai602ViTUnet
from vitlab.models.blocks import BlockSpec, layer_norm
from vitlab.models.gan import ResnetBlock, init_gan_weights
from vitlab.models.presets import is_ai602, meta_parameter_count, preset_config
from vitlab.models.vit import PatchEmbed


def token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, h·w, D) row-major tokens of a square grid → (B, D, h, w)."""
    side = round(tokens.shape[1] ** 0.5)
    return rearrange(tokens, "b (h w) d -> b d h w", h=side)


def downsample_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Halve the token grid's side by averaging 2×2 neighbours: (B, N, D) → (B, N/4, D)."""
    return rearrange(F.avg_pool2d(token_grid(tokens), 2), "b d h w -> b (h w) d")


def upsample_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Double the token grid's side by bilinear interpolation: (B, N, D) → (B, 4N, D)."""
    grid = F.interpolate(token_grid(tokens), scale_factor=2, mode="bilinear", align_corners=False)
    return rearrange(grid, "b d h w -> b (h w) d")


class Refiner(nn.Module):
    """Residual CNN that corrects the un-patchified image: coarse + conv(ResNet blocks(conv(input)))."""

    def __init__(self, in_chans: int, out_chans: int, channels: int, num_blocks: int):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, channels, 3, padding=1, padding_mode="reflect")
        self.blocks = nn.Sequential(*[ResnetBlock(channels) for _ in range(num_blocks)])
        self.out = nn.Conv2d(channels, out_chans, 3, padding=1, padding_mode="reflect")

    def forward(self, coarse: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        x = coarse if image is None else torch.cat([coarse, image], dim=1)
        return coarse + self.out(F.relu(self.blocks(F.relu(self.stem(x)))))


class ViTUnet(nn.Module):
    """ViTUnet image-to-image generator; the transformer keywords are VisionTransformer's."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 32,
        in_chans: int = 3,
        out_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_dim: int = 1536,
        block: str = "serial",
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_bias: bool = True,
        branch_norm: str = "none",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        attn_impl: str = "auto",
        levels: int = 1,
        stage_depth: int | None = None,
        refine_channels: int = 32,
        refine_blocks: int = 2,
        input_skip: bool = False,
    ):
        super().__init__()
        spec = BlockSpec(
            block,
            embed_dim,
            num_heads,
            mlp_dim,
            qkv_bias,
            qk_norm,
            norm_bias,
            branch_norm,
            dropout,
            attn_dropout,
            drop_path,
            attn_impl,
        )
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid
        if levels < 0 or grid % 2**levels:
            raise VitlabError(
                f"levels={levels}: the {grid}x{grid} token grid ({img_size} px / patch {patch_size}) must halve "
                f"evenly {levels} times; use fewer levels, a smaller patch or a larger image"
            )
        stage_depth = stage_depth or max(1, depth // 6)  # paper §4.1: depth/6 blocks per stage
        self.patch_size, self.input_skip = patch_size, input_skip
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))

        num_stages = 2 * levels + 1
        # Stochastic depth grows linearly over all blocks, from the first encoder block to the last decoder one.
        blocks = spec.build(num_stages * stage_depth)
        stages = [nn.Sequential(*blocks[i * stage_depth : (i + 1) * stage_depth]) for i in range(num_stages)]
        self.encoder = nn.ModuleList(stages[:levels])
        self.bottleneck = stages[levels]
        self.decoder = nn.ModuleList(stages[levels + 1 :])
        self.fuse = nn.ModuleList([nn.Linear(2 * embed_dim, embed_dim) for _ in range(levels)])
        self.norm = layer_norm(embed_dim, norm_bias)
        self.head = nn.Linear(embed_dim, out_chans * patch_size**2)
        self.refine = Refiner(out_chans + (in_chans if input_skip else 0), out_chans, refine_channels, refine_blocks)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT init for the transformer (trunc-normal 0.02, zero biases), CycleGAN's for the CNN."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_gan_weights(self.refine)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image) + self.pos_embed
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = downsample_tokens(x)
        x = self.bottleneck(x)
        for stage, fuse in zip(self.decoder, self.fuse):
            x = stage(fuse(torch.cat([upsample_tokens(x), skips.pop()], dim=-1)))
        patches = self.head(self.norm(x))
        grid = self.patch_embed.grid
        coarse = rearrange(patches, "b (h w) (c p q) -> b c (h p) (w q)", h=grid, p=self.patch_size, q=self.patch_size)
        return torch.tanh(self.refine(coarse, image if self.input_skip else None))


def unet_class(name: str = "vit-s/32") -> type[nn.Module]:
    """The generator a backbone preset builds: vitlab's ViTUnet, or the code's Ai602ViTUnet for `ai602-…` names."""
    return Ai602ViTUnet if is_ai602(name) else ViTUnet


def unet_options(name: str = "vit-s/32") -> list[str]:
    """Names of every keyword that `create_unet(name, …)` accepts as an override."""
    return list(inspect.signature(unet_class(name)).parameters)


def create_unet(name: str, **overrides) -> nn.Module:
    """A ViTUnet whose backbone is the preset `name` (`vit-s/32`, `vit22b-s/32`, `ai602-vit-s/32`, …)."""
    allowed = unet_options(name)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise VitlabError(f"unknown ViTUnet option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    preset = {k: v for k, v in preset_config(name).items() if k in allowed}  # a classifier head is no generator's
    return unet_class(name)(**{**preset, **overrides})


def count_unet_parameters(name: str, **overrides) -> int:
    """Parameter count of `create_unet(name, **overrides)`, built on the meta device."""
    return meta_parameter_count(lambda: create_unet(name, **overrides))
