"""The Vision Transformer, assembled from `blocks`: serial (ViT) or parallel (ViT-22B) blocks."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError, check_choice
from vitlab.models.blocks import BlockSpec, LayerScale, ParallelBlock, layer_norm
from vitlab.models.kernels import gemm

POS_EMBEDS = ("learn", "sincos")
POOLS = ("cls", "gap")
HEADS = ("linear", "mlp")


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid_h*grid_w, dim), row-major patch order.

    A quarter of the channels each for sin(x), cos(x), sin(y), cos(y) (Beyer et al. 2022, "Better plain ViT").
    """
    if dim % 4:
        raise VitlabError(f"sin-cos position embedding needs a width divisible by 4, got embed_dim={dim}")
    y, x = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    x = x.flatten()[:, None] * omega[None, :]
    y = y.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def init_weights(module: nn.Module) -> None:
    """Reference ViT init of one module's own tensors: trunc-normal(0.02) weights, zero biases, unit norm scales."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, LayerScale):
        module.reset_parameters()
    elif isinstance(module, ParallelBlock):
        nn.init.zeros_(module.mlp_bias)
        if module.qkv_bias is not None:
            nn.init.zeros_(module.qkv_bias)


def check_num_registers(num_registers: object) -> None:
    """Refuse a register count that is not a whole number >= 0."""
    if isinstance(num_registers, bool) or not isinstance(num_registers, int) or num_registers < 0:
        raise VitlabError(
            f"num_registers={num_registers!r} must be a whole number >= 0; use 0 for none, or e.g. 4 (Darcet et al. 2023)"
        )


def check_num_classes(num_classes: int) -> None:
    """Refuse a negative class count."""
    if num_classes < 0:
        raise VitlabError(f"num_classes={num_classes} is negative; use 0 for no head or the number of classes")


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to `dim` (timm naming: proj)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if patch_size < 1 or img_size < patch_size:
            raise VitlabError(
                f"image size {img_size} and patch size {patch_size} make no patch; "
                "use a positive patch size and an image size that is a multiple of it"
            )
        if img_size % patch_size:
            raise VitlabError(
                f"image size {img_size} is not divisible by patch size {patch_size}; "
                f"use an image size that is a multiple of {patch_size}"
            )
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise VitlabError(
                f"input is {tuple(x.shape[-2:])} pixels but the model was built for "
                f"{self.img_size}x{self.img_size}; resize the input or rebuild the model with img_size={x.shape[-1]}"
            )
        # The strided convolution as a reshape and one GEMM with its weight (the same sums); the GEMM runs
        # bf16 at fp32 speed on CPUs without bf16 units (see `gemm`), where Conv2d fell back to a slow kernel.
        patches = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch_size, q=self.patch_size)
        return gemm(F.linear, patches, self.proj.weight.flatten(1), self.proj.bias)


class VisionTransformer(nn.Module):
    """ViT classifier. Defaults are the classic ViT; the `vit22b` presets switch to the ViT-22B block.

    Stabilisers: `layer_scale` (CaiT's per-channel gain on every residual branch, starting at that value) and
    `num_registers` (Darcet et al. 2023: learnable tokens appended after the position embedding, with none of
    their own, seen by every block and cut before the final norm, so pooling, heads and prefixes never see them).
    """

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
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_bias: bool = True,
        branch_norm: str = "none",
        pos_embed: str = "learn",
        pool: str = "cls",
        fc_norm: bool = False,
        head: str = "linear",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        zero_head: bool = False,
        attn_impl: str = "auto",
        grad_checkpointing: bool = False,
        layer_scale: float | None = None,
        num_registers: int = 0,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
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
            layer_scale,
        )
        check_choice("pos_embed", pos_embed, POS_EMBEDS)
        check_choice("pool", pool, POOLS)
        check_choice("head", head, HEADS)
        check_num_classes(num_classes)
        check_num_registers(num_registers)
        if fc_norm and pool != "gap":
            raise VitlabError("fc_norm=True normalises the pooled patch tokens; use it with pool='gap' (MAE's fine-tuning)")

        self.num_classes, self.embed_dim, self.pool, self.zero_head = num_classes, embed_dim, pool, zero_head
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = self.make_patch_embed(img_size, patch_size, in_chans, embed_dim)
        self.num_prefix_tokens = 1 if pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "cls" else None
        num_positions = self.patch_embed.grid**2 + self.num_prefix_tokens
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        else:  # filled by `reset_embeddings`, so that a model built on the meta device is complete after it
            self.register_buffer("pos_embed", torch.empty(1, num_positions, embed_dim), persistent=False)
        self.num_registers = num_registers
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None  # timm's name
        self.pos_drop = nn.Dropout(dropout)

        self.blocks = nn.Sequential(*spec.build(depth))
        # fc_norm: the final LayerNorm after the average pool instead of on every token (MAE's fine-tuning
        # model, models_vit.py in facebookresearch/mae; timm's `fc_norm`, under the same tensor names).
        self.norm = nn.Identity() if fc_norm else layer_norm(embed_dim, norm_bias)
        self.fc_norm = layer_norm(embed_dim, norm_bias) if fc_norm else nn.Identity()
        if head == "mlp":  # the original ViT's pre-logits layer (Dosovitskiy et al. 2021)
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(embed_dim, embed_dim), act=nn.Tanh()))
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def make_patch_embed(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> nn.Module:
        """Images → tokens (B, grid², dim), with a `grid` attribute: the patches' linear projection here."""
        return PatchEmbed(img_size, patch_size, in_chans, dim)

    def reset_parameters(self) -> None:
        """Reference ViT init: `init_weights` on every module in order, then `reset_embeddings`."""
        for module in self.modules():
            init_weights(module)
        self.reset_embeddings()

    def reset_embeddings(self) -> None:
        """Trunc-normal(0.02) learned position embedding (or the sin-cos table), zero class token, N(0, 1e-6) registers
        (DINOv2's and timm's init), optional zero head."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            grid = self.patch_embed.grid
            table = sincos_2d_position_embedding(grid, grid, self.embed_dim)
            self.pos_embed.copy_(torch.cat([table.new_zeros(self.num_prefix_tokens, self.embed_dim), table])[None])
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        if self.zero_head and isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def reset_head(self, num_classes: int, zero: bool | None = None) -> None:
        """A new head for `num_classes` (0: none), initialised as at build, all zeros if `zero` (default: `zero_head`).

        Backbone and pre-logits layer are kept (timm's `reset_classifier`); the new head takes no random draws when zero.
        """
        check_num_classes(num_classes)
        self.num_classes = self.config["num_classes"] = num_classes
        if num_classes == 0:
            self.head = nn.Identity()
            return
        like = self.patch_embed.proj.weight
        self.head = nn.utils.skip_init(nn.Linear, self.embed_dim, num_classes, device=like.device, dtype=like.dtype)
        if self.zero_head if zero is None else zero:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            init_weights(self.head)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → tokens (B, prefix + patches, D) with position embedding added."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images → the tokens after the last block, normalised (with `fc_norm`: not yet, the pooled vector is)."""
        return self.forward_tokens(self.embed(x))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens (B, T, D) → normalised tokens (B, T, D) after the blocks, the registers appended and cut."""
        if self.reg_token is not None:
            x = torch.cat([x, self.reg_token.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Activation checkpointing: keep each block's input only, recompute its inside in the backward.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x[:, : x.shape[1] - self.num_registers])

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pool the tokens (class token or mean of patches) and apply the head."""
        return self.head(self.pre_logits(self.pooled(tokens)))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The features the head sees: the class token, or the mean of the patch tokens (then `fc_norm`)."""
        return tokens[:, 0] if self.pool == "cls" else self.fc_norm(tokens.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
