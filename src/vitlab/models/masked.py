"""Masked image modelling on vitlab's VisionTransformer: MAE (He et al. 2022) and MPP (Dosovitskiy et al. 2021).

Both wrap an `encoder` (a VisionTransformer built without a head) and use its own patch_embed, pos_embed,
cls_token, and blocks and norm through `forward_tokens` (which appends and cuts its registers), so the encoder's
state dict is a classifier's minus the head and fine-tuning loads it like any vitlab run. Everything else (MAE's decoder, MPP's mask token and
colour head) lives beside it and is dropped after pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.blocks import ParallelBlock, SerialBlock, layer_norm
from vitlab.models.vit import VisionTransformer, init_weights, sincos_2d_position_embedding

METHODS = ("mae", "mpp")


def random_masking(tokens: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random (1 - ratio) of each row's tokens: the kept tokens, the mask (1 = removed) and the restore indices.

    MAE's per-sample shuffle: sort uniform noise, keep the first tokens of the shuffle; `ids_restore`
    (each token's rank in the shuffle) puts a shuffled sequence back in patch order.
    """
    b, n, d = tokens.shape
    keep = n - round(n * ratio)
    ids_shuffle = torch.rand(b, n, device=tokens.device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = tokens.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    return kept, (ids_restore >= keep).float(), ids_restore


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Images (B, C, H, W) → patches (B, N, patch·patch·C), row-major patch order."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """Patches (B, N, patch·patch·C) → images (B, C, H, W); the inverse of `patchify`."""
    grid = round(patches.shape[1] ** 0.5)
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, w=grid, p=patch, q=patch, c=channels)


def paste(images: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """`images` with the patches where `mask` is 1 replaced by `patches` (B, N, patch·patch·C)."""
    mixed = torch.where(mask[..., None].bool(), patches, patchify(images, patch))
    return unpatchify(mixed, patch, images.shape[1])


def colour_classes(pixels: torch.Tensor, patch: int, bits: int = 3) -> torch.Tensor:
    """Each patch's mean colour quantised to `bits` per channel, as one class (B, N) in [0, 2^(3·bits)).

    Dosovitskiy et al. 2021, App. B.1.2: 3 bits per channel, 512 colours. `pixels` are in [0, 1].
    """
    levels = 2**bits
    means = rearrange(pixels, "b c (h p) (w q) -> b (h w) c (p q)", p=patch, q=patch).mean(-1)
    bins = (means * levels).floor().long().clamp(0, levels - 1)
    return (bins * levels ** torch.arange(bins.shape[-1] - 1, -1, -1, device=bins.device)).sum(-1)


def transformer_blocks(encoder: VisionTransformer, dim: int, depth: int, num_heads: int) -> nn.Sequential:
    """`depth` blocks of the encoder's family and switches at another width (MLP 4× wide)."""
    c = encoder.config
    kwargs = dict(
        dim=dim,
        num_heads=num_heads,
        mlp_dim=4 * dim,
        qkv_bias=c["qkv_bias"],
        qk_norm=c["qk_norm"],
        norm_bias=c["norm_bias"],
        attn_impl=c["attn_impl"],
        layer_scale_init=c["layer_scale"],
    )
    if c["block"] == "parallel":
        return nn.Sequential(*[ParallelBlock(branch_norm=c["branch_norm"], **kwargs) for _ in range(depth)])
    return nn.Sequential(*[SerialBlock(**kwargs) for _ in range(depth)])


def check_encoder(encoder: VisionTransformer) -> None:
    """Pretraining needs a headless encoder (num_classes=0) that norms every token: a classifier's weights minus the head."""
    if not isinstance(encoder.head, nn.Identity):
        raise VitlabError("the pretraining encoder must be built with num_classes=0 (no head)")
    if encoder.config["fc_norm"]:
        raise VitlabError(
            "the pretraining encoder normalises every token (its decoder reads them); pretrain with fc_norm: false "
            "and set fc_norm: true in the fine-tuning config's model.options"
        )


class MaskedAutoencoder(nn.Module):
    """MAE: the encoder on the visible patches only, a light decoder with mask tokens fills in the pixels.

    Defaults are the paper's (He et al. 2022): 75 % masking, an 8-block 512-wide decoder with
    16 heads and fixed sin-cos position embedding, per-patch normalised pixel targets.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        check_encoder(encoder)
        if not 0 < mask_ratio < 1:
            raise VitlabError(f"mask_ratio={mask_ratio} must be in (0, 1)")
        self.encoder, self.mask_ratio, self.norm_pix_loss = encoder, mask_ratio, norm_pix_loss
        self.patch, grid = encoder.patch_embed.patch_size, encoder.patch_embed.grid
        self.channels = encoder.patch_embed.proj.in_channels
        prefix = encoder.num_prefix_tokens
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        table = sincos_2d_position_embedding(grid, grid, decoder_dim)
        self.register_buffer(
            "decoder_pos_embed", torch.cat([table.new_zeros(prefix, decoder_dim), table])[None], persistent=False
        )
        self.decoder_blocks = transformer_blocks(encoder, decoder_dim, decoder_depth, decoder_heads)
        self.decoder_norm = layer_norm(decoder_dim, encoder.config["norm_bias"])
        self.decoder_pred = nn.Linear(decoder_dim, self.patch**2 * self.channels)
        for name, module in self.named_modules():
            if not name.startswith("encoder"):
                init_weights(module)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images → the encoder's tokens of the visible patches (after the class token, if any), the mask, the restore indices."""
        enc = self.encoder
        prefix = enc.num_prefix_tokens
        tokens, mask, ids_restore = random_masking(enc.patch_embed(x) + enc.pos_embed[:, prefix:], self.mask_ratio)
        if enc.cls_token is not None:
            tokens = torch.cat([(enc.cls_token + enc.pos_embed[:, :prefix]).expand(x.shape[0], -1, -1), tokens], dim=1)
        return enc.forward_tokens(tokens), mask, ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoded visible tokens → predicted pixels of every patch (B, N, patch·patch·C)."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        shuffled = torch.cat([x[:, prefix:], self.mask_token.expand(b, n + prefix - x.shape[1], -1)], dim=1)
        patches = shuffled.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x))[:, prefix:])

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images → predicted patches and the mask (1 = masked)."""
        latent, mask, ids_restore = self.encode(x)
        return self.decode(latent, ids_restore), mask

    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pixel targets per patch, with the mean and std that normalise them (1 and 0 without norm_pix_loss)."""
        target = patchify(x.float(), self.patch)
        if not self.norm_pix_loss:
            return target, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
        mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return (target - mean) / std, mean, std

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        per_patch = (pred.float() - self.targets(x)[0]).square().mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss(x, *self.predict(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MAE Fig. 2: the masked input (masked patches at 0) and the reconstruction with the visible patches pasted in."""
        pred, mask = self.predict(x)
        _, mean, std = self.targets(x)
        masked = paste(x, torch.zeros_like(pred), mask, self.patch)
        return masked, paste(x, pred.float() * std + mean, mask, self.patch)


class MaskedPatchPrediction(nn.Module):
    """MPP (Dosovitskiy et al. 2021, App. B.1.2): corrupt half the patch embeddings, predict their 3-bit mean colour.

    Of the corrupted patches 80 % get a learnable mask token, 10 % another patch's embedding (from
    anywhere in the batch) and 10 % stay as they are, as BERT does with words. `mean`, `std` undo the
    input normalisation to find the colours.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        mask_ratio: float = 0.5,
        replace: tuple[float, float] = (0.8, 0.1),
        bits: int = 3,
    ):
        super().__init__()
        check_encoder(encoder)
        if not 0 < mask_ratio < 1 or min(replace) < 0 or sum(replace) > 1:
            raise VitlabError(f"mask_ratio={mask_ratio} must be in (0, 1) and the replace fractions {replace} sum to at most 1")
        self.encoder, self.mask_ratio, self.replace, self.bits = encoder, mask_ratio, replace, bits
        self.patch = encoder.patch_embed.patch_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        self.mpp_head = nn.Linear(encoder.embed_dim, 2 ** (3 * bits))
        init_weights(self.mpp_head)
        nn.init.normal_(self.mask_token, std=0.02)

    def corrupt(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch embeddings → corrupted embeddings, the corrupted mask and the mask-token mask (both 1 = yes)."""
        _, corrupted, ids_restore = random_masking(tokens, self.mask_ratio)
        b, n, d = tokens.shape
        rank = ids_restore - (n - round(n * self.mask_ratio))  # position among the corrupted patches, < 0 if kept
        num_corrupted = round(n * self.mask_ratio)
        n_mask, n_other = round(num_corrupted * self.replace[0]), round(num_corrupted * self.replace[1])
        to_mask = (rank >= 0) & (rank < n_mask)
        to_other = (rank >= n_mask) & (rank < n_mask + n_other)
        others = tokens.flatten(0, 1)[torch.randint(b * n, (b, n), device=tokens.device)]
        tokens = torch.where(to_other[..., None], others, tokens)
        return torch.where(to_mask[..., None], self.mask_token.to(tokens.dtype), tokens), corrupted, to_mask.float()

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images → colour logits of every patch (B, N, 512), the corrupted mask and the mask-token mask."""
        enc = self.encoder
        prefix = enc.num_prefix_tokens
        tokens, corrupted, masked = self.corrupt(enc.patch_embed(x))
        if enc.cls_token is not None:
            tokens = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = enc.forward_tokens(tokens + enc.pos_embed)
        return self.mpp_head(tokens[:, prefix:]), corrupted, masked

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """The colour class of every patch of the (normalised) images."""
        return colour_classes((x.float() * self.std + self.mean).clamp(0, 1), self.patch, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, corrupted, _ = self.predict(x)
        return F.cross_entropy(logits[corrupted.bool()].float(), self.targets(x)[corrupted.bool()])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input with its mask-token patches at 0, and with every corrupted patch painted its predicted colour."""
        logits, corrupted, masked = self.predict(x)
        levels = 2**self.bits
        classes = logits.argmax(-1)
        digits = torch.stack([classes // levels**2, classes // levels % levels, classes % levels], dim=-1)
        colour = ((digits.float() + 0.5) / levels - self.mean.view(1, 1, -1)) / self.std.view(1, 1, -1)
        painted = colour.repeat(1, 1, self.patch**2)  # (p q c) order: the colour repeated per pixel
        return paste(x, torch.zeros_like(painted), masked, self.patch), paste(x, painted, corrupted, self.patch)


def build_pretrainer(method: str, encoder: VisionTransformer, **options) -> nn.Module:
    """The pretraining module of `method` (mae or mpp) around `encoder`."""
    if method == "mae":
        return MaskedAutoencoder(encoder, **options)
    if method == "mpp":
        return MaskedPatchPrediction(encoder, **options)
    raise VitlabError(f"unknown pretraining method {method!r}; allowed: {', '.join(METHODS)}")
