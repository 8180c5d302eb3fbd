"""The networks the paper's code ran (HongSungRae/ai602, newest commit 63e7ad0), rebuilt element by element.

They differ from the paper's text and from vitlab's own blocks; `vitlab.models.presets` names them
`ai602-vit-*` and `ai602-vit22b-*` (`ai602-vit-b/16`, …).
  attention    no bias in the QKV projection; q kᵀ scaled by dim**-0.5, the full width (not the head width);
  ai602-vit    (models/vit.py) pre-LN serial blocks with affine LayerNorms (PyTorch's eps 1e-5),
               no final LayerNorm, head Linear(dim, mlp_dim) → GELU → Linear(mlp_dim, classes);
  ai602-vit22b (models/vit22b.py) no input LayerNorm: y = x + LN(Attn(x) + MLP(x)) with a non-affine LN on
               the sum; one shared non-affine LayerNorm(head_dim) on q and k; separate (unfused) attention
               and MLP projections; no final LayerNorm; head Linear → BatchNorm1d → GELU → Linear;
  both         patches flattened as (p1 p2 c) into a Linear embedding; class token and position embedding
               drawn from N(0, 1); every other tensor keeps PyTorch's default init;
  ViTUnet      (models/vitunet.py, vit22bunet.py) `Ai602ViTUnet`;
  discriminator (models/discriminator.py) `Ai602Discriminator`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.blocks import Attention, BlockSpec, Mlp, merge_heads, split_heads
from vitlab.models.gan import ResnetBlock, init_gan_weights
from vitlab.models.kernels import attend, attention_logits


def check_block_options(block: str, attn_impl: str, dim: int, num_heads: int) -> None:
    """The checks vitlab's own blocks make of these keywords (the code's blocks have no other switches)."""
    BlockSpec(
        block,
        dim,
        num_heads,
        mlp_dim=dim,
        qkv_bias=False,
        qk_norm=False,
        norm_bias=False,
        branch_norm="none",
        dropout=0.0,
        attn_dropout=0.0,
        drop_path=0.0,
        attn_impl=attn_impl,
    )


class FullWidthAttention(Attention):
    """The code's attention: no QKV bias, logits q kᵀ · dim**-0.5, optionally one shared non-affine QK LayerNorm."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, attn_impl: str = "auto"):
        super().__init__(dim, num_heads, qkv_bias=False, attn_impl=attn_impl)
        if qk_norm:
            self.q_norm = self.k_norm = nn.LayerNorm(dim // num_heads, elementwise_affine=False)
        # `attend` divides by √head_dim; q · √(head_dim / dim) = q / √heads turns that into the code's 1/√dim.
        self.rescale = num_heads**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.q_norm(q) * self.rescale, self.k_norm(k)
        if self.attention_hook is not None:
            self.attention_hook(attention_logits(q, k))
        return self.proj(merge_heads(attend(q, k, v, self.attn_impl)))


class PreNormBlock(nn.Module):
    """The code's ViT block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, attn_impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FullWidthAttention(dim, num_heads, attn_impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SumNormParallelBlock(nn.Module):
    """The code's ViT-22B block: x + LN(Attn(x) + MLP(x)), QK-normed attention, non-affine LN, no input LN.

    `sum_norm=False` drops the LN on the sum, y = x + Attn(x) + MLP(x): nothing then bounds what a block
    adds to the residual stream (the code's first commit, eeb88f0, had no such LN; it also fused the projections).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, attn_impl: str = "auto", sum_norm: bool = True):
        super().__init__()
        self.attn = FullWidthAttention(dim, num_heads, qk_norm=True, attn_impl=attn_impl)
        self.mlp = Mlp(dim, mlp_dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if sum_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.attn(x) + self.mlp(x))


BLOCKS = {"serial": PreNormBlock, "parallel": SumNormParallelBlock}


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, patches, p·p·C) in the code's (p1 p2 c) order."""
    if images.shape[-1] % patch_size or images.shape[-2] % patch_size:
        raise VitlabError(f"image size {tuple(images.shape[-2:])} is not divisible by the patch size {patch_size}")
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def check_patches(img_size: int, patch_size: int) -> int:
    """The side of the patch grid; an image size the patches do not tile is an error."""
    if img_size % patch_size:
        raise VitlabError(f"image size {img_size} is not divisible by patch size {patch_size}")
    return img_size // patch_size


class Ai602ViT(nn.Module):
    """The code's classifier: `block="serial"` is models/vit.py, `"parallel"` with `head_batchnorm` models/vit22b.py."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        block: str = "serial",
        head_batchnorm: bool = False,
        sum_norm: bool = True,
        attn_impl: str = "auto",
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_block_options(block, attn_impl, embed_dim, num_heads)
        if not sum_norm and block != "parallel":
            raise VitlabError("sum_norm=False needs block='parallel' (it removes the LayerNorm on the parallel branches' sum)")
        extra = {} if sum_norm else dict(sum_norm=False)
        grid = check_patches(img_size, patch_size)
        self.patch_size, self.num_classes = patch_size, num_classes
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, embed_dim))
        self.patch_embed = nn.Linear(in_chans * patch_size**2, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.blocks = nn.Sequential(*[BLOCKS[block](embed_dim, num_heads, mlp_dim, attn_impl, **extra) for _ in range(depth)])
        norm = [nn.BatchNorm1d(mlp_dim)] if head_batchnorm else []
        self.head = nn.Sequential(nn.Linear(embed_dim, mlp_dim), *norm, nn.GELU(), nn.Linear(mlp_dim, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patchify(images, self.patch_size))
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.blocks(x)[:, 0])


def resize_width(tokens: torch.Tensor, factor: float) -> torch.Tensor:
    """Nearest-neighbour resampling of the channel axis of (B, N, D) tokens, as the code's F.interpolate did."""
    return F.interpolate(tokens, scale_factor=factor)


class Ai602ViTUnet(nn.Module):
    """The code's ViTUnet: seven stages of depth/6 blocks, widths D, D/2, D/4, D/8, D/4, D/2, D.

    Resampling halves or doubles the width (the channel axis), never the tokens; each decoder stage
    reads its skip concatenated along the token axis (N → 2N → 3N → 4N). The 4N output tokens become
    four images stacked as 4·C channels, which a CNN (4C → 64 → 128, depth/3 ResNet blocks, 128 → 64 → C)
    and a tanh turn into the output. `block` is `serial` (vitunet.py) or `parallel` (vit22bunet.py).
    """

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 32,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_dim: int = 1536,
        block: str = "serial",
        attn_impl: str = "auto",
    ):
        super().__init__()
        check_block_options(block, attn_impl, embed_dim // 8, num_heads)
        if depth % 6 or embed_dim % 8 or mlp_dim % 8:
            raise VitlabError(
                f"depth={depth}, embed_dim={embed_dim} and mlp_dim={mlp_dim}: depth must be a multiple of 6 "
                "and both widths multiples of 8 (three halvings)"
            )
        self.grid = check_patches(img_size, patch_size)
        self.patch_size, self.in_chans = patch_size, in_chans
        patch_dim = in_chans * patch_size**2
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid**2, embed_dim))
        self.patch_embed = nn.Linear(patch_dim, embed_dim)

        def stage(level: int) -> nn.Sequential:
            width, hidden = embed_dim // 2**level, mlp_dim // 2**level
            return nn.Sequential(*[BLOCKS[block](width, num_heads, hidden, attn_impl) for _ in range(depth // 6)])

        encoders, decoders = [], []
        for level in range(3):
            encoders.append(stage(level))
            decoders.append(stage(2 - level))
        self.encoders, self.decoders = nn.ModuleList(encoders), nn.ModuleList(decoders)
        self.peak = stage(3)
        self.to_pixels = nn.Linear(embed_dim, patch_dim)

        def conv(cin: int, cout: int, activation: bool = True) -> list[nn.Module]:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")]
            return layers + [nn.InstanceNorm2d(cout), nn.ReLU()] if activation else layers

        self.cnn = nn.Sequential(
            *conv(4 * in_chans, 64),
            *conv(64, 128),
            *[ResnetBlock(128) for _ in range(depth // 3)],
            *conv(128, 64),
            *conv(64, in_chans, activation=False),
        )
        init_gan_weights(self)  # the code's weight_init: convolutions from N(0, 0.02), zero biases

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patchify(images, self.patch_size)) + self.pos_embed
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(resize_width(x, 0.5) if level else x)
            skips.append(x)
        x = self.peak(resize_width(x, 0.5))
        for decoder in self.decoders:
            x = decoder(torch.cat([skips.pop(), resize_width(x, 2)], dim=1))
        pixels = self.to_pixels(x)
        stacked = rearrange(
            pixels,
            "b (t h w) (p q c) -> b (t c) (h p) (w q)",
            t=4,
            h=self.grid,
            p=self.patch_size,
            q=self.patch_size,
            c=self.in_chans,
        )
        return torch.tanh(self.cnn(stacked))


class Ai602Discriminator(nn.Module):
    """The code's discriminator: four 4×4 stride-2 convolutions (padding 2) 3 → 16 → 32 → 16 → 3, each with
    InstanceNorm and LeakyReLU 0.2, then a 4×4 convolution to one channel and a sigmoid (a 16×16 map at 256 px)."""

    def __init__(self, in_chans: int = 3, widths: tuple[int, ...] = (16, 32, 16, 3)):
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in zip((in_chans, *widths[:-1]), widths):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=2), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1), nn.Sigmoid())
        init_gan_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
