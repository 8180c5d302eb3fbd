"""Attention maps of every layer and head, and attention rollout (Abnar & Zuidema 2020).

Attention tensors are softmax weights of shape (layers, B, heads, tokens, tokens), rows are
queries; the first `num_prefix_tokens` tokens are the class token (if any), the rest the patches
in row-major order. Register tokens (`num_registers`) are cut from both axes: the maps show what the class
token and the patches attend to among themselves, and a row sums to one minus what the query gave the
registers (Darcet et al. 2023: the attention that registers take over from high-norm patches). A query is
"cls" (the class token), "mean" (the average row: what the tokens attend to on the whole, the natural choice
for a model with average pooling) or a patch index.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from matplotlib.patches import Rectangle

from vitlab.errors import VitlabError
from vitlab.figures import image_array, new_figure, save_figure, to_unit_range
from vitlab.models.blocks import watch_attention
from vitlab.models.vit import VisionTransformer

Query = str | int


@torch.no_grad()
def attention_maps(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights of every layer for normalised `images`: (layers, B, heads, tokens, tokens), registers cut."""
    weights: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with watch_attention(model, lambda layer, logits: weights.__setitem__(layer, logits.softmax(dim=-1))):
            model(images)
    finally:
        model.train(was_training)
    maps = torch.stack([weights[layer] for layer in sorted(weights)])
    kept = maps.shape[-1] - model.num_registers
    return maps[..., :kept, :kept]


def default_query(model: VisionTransformer) -> str:
    """The default query: "cls" for a model with a class token, "mean" for one with average pooling."""
    return "cls" if model.num_prefix_tokens else "mean"


def query_attention(matrix: torch.Tensor, num_prefix_tokens: int, query: Query) -> torch.Tensor:
    """The query's row of (…, tokens, tokens) matrices over the patch keys, as a grid: (…, side, side).

    On `attention_maps` it gives what the query attends to per layer and head: (layers, B, heads, side, side).
    """
    num_patches = matrix.shape[-1] - num_prefix_tokens
    side = math.isqrt(num_patches)
    if query == "cls":
        if not num_prefix_tokens:
            raise VitlabError("the model has no class token (pool='gap'); use query='mean' or a patch index")
        row = matrix[..., 0, :]
    elif query == "mean":
        row = matrix.mean(dim=-2)
    elif isinstance(query, int) and 0 <= query < num_patches:
        row = matrix[..., num_prefix_tokens + query, :]
    else:
        allowed = f"'cls', 'mean', a patch index in [0, {num_patches})"
        raise VitlabError(f"query={query!r} is not supported; allowed: {allowed}")
    return rearrange(row[..., num_prefix_tokens:], "... (h w) -> ... h w", h=side)


def attention_rollout(maps: torch.Tensor, num_prefix_tokens: int, query: Query, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout over all layers: (B, side, side), how much the query's output draws on each patch.

    Per layer, heads are averaged and the residual connection is accounted for as
    `residual`·I + (1 − residual)·A with rows renormalised; the layers' matrices are then
    multiplied from the first to the last (Abnar & Zuidema 2020).
    """
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
    rollout = eye.expand(maps.shape[1], -1, -1)
    for layer in maps.mean(dim=2):
        mixed = residual * eye + (1 - residual) * layer
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    return query_attention(rollout, num_prefix_tokens, query)


def _describe(query: Query) -> str:
    """The query in words, for titles."""
    if query == "cls":
        return "the class token"
    return "the mean over queries" if query == "mean" else f"patch {query}"


def plot_attention_maps(image: torch.Tensor, maps: torch.Tensor, query: Query, path: str | Path) -> Path:
    """PNG: the image, then the query's attention over the patch grid for each layer (rows) and head (columns).

    `maps` is one image's (layers, heads, side, side) from `query_attention`; each map has its own colour scale.
    """
    layers, heads, side = maps.shape[:3]
    fig = new_figure(1.3 * (heads + 1), 1.3 * layers + 0.4)
    axes = fig.subplots(layers, heads + 1, squeeze=False)
    shown = to_unit_range(maps.float()).cpu().numpy()
    pixels = image.shape[-1] / side
    for layer in range(layers):
        axes[layer, 0].imshow(image_array(image), cmap="gray")
        axes[layer, 0].set_ylabel(f"layer {layer + 1}")
        for head in range(heads):
            axes[layer, head + 1].imshow(shown[layer, head], cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
            if layer == 0:
                axes[0, head + 1].set_title(f"head {head + 1}", fontsize=9)
        if isinstance(query, int):  # outline the query patch on the image and on every map
            row, col = divmod(query, side)
            for ax, scale in zip(axes[layer], [pixels] + [1] * heads):
                corner = (col * scale - 0.5, row * scale - 0.5)  # imshow centres pixel i at i
                ax.add_patch(Rectangle(corner, scale, scale, fill=False, edgecolor="cyan", linewidth=1.2))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Attention of {_describe(query)} to the patches (each map scaled to its own range)", fontsize=10)
    return save_figure(fig, path)


def plot_rollout(images: torch.Tensor, rollout: torch.Tensor, query: Query, path: str | Path) -> Path:
    """PNG: per image, the image, its attention rollout over the patch grid, and the image weighted by it."""
    count = len(images)
    fig = new_figure(6.0, 2.0 * count + 0.4)
    axes = fig.subplots(count, 3, squeeze=False)
    masks = to_unit_range(rollout.float()).cpu()
    size = images.shape[-2:]
    for i, (image, mask) in enumerate(zip(images.cpu(), masks)):
        upsampled = F.interpolate(mask[None, None], size=size, mode="bilinear", align_corners=False)[0]
        axes[i, 0].imshow(image_array(image), cmap="gray")
        axes[i, 1].imshow(mask.numpy(), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        axes[i, 2].imshow(image_array((image.float() * upsampled.clamp(0, 1)).round().to(torch.uint8)), cmap="gray")
    for ax, title in zip(axes[0], ("image", "rollout", "image × rollout")):
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Attention rollout of {_describe(query)} through all layers", fontsize=10)
    return save_figure(fig, path)
