"""What the embeddings learned: position-embedding similarity and the patch-embedding filters' principal components.

Dosovitskiy et al. 2021, Fig. 7 left and centre.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from vitlab.figures import new_figure, save_figure, to_unit_range
from vitlab.models.vit import VisionTransformer


def position_embedding_similarity(model: VisionTransformer) -> torch.Tensor:
    """Cosine similarity of every patch's position embedding with every other's: (side, side, side, side).

    Entry [r, c] is the similarity map of the patch in row r, column c with all patches; prefix
    tokens are left out.
    """
    table = model.pos_embed.detach()[0, model.num_prefix_tokens :].float()
    side = math.isqrt(table.shape[0])
    unit = F.normalize(table, dim=-1)
    return rearrange(unit @ unit.T, "(r c) (h w) -> r c h w", r=side, h=side)


def patch_embedding_components(model: VisionTransformer, count: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Top principal components of the patch-embedding filters: (count, C, P, P) and their explained variance ratios.

    Each of the D output channels' filters is one sample of dimension C·P·P; components are unit
    vectors, their sign is arbitrary.
    """
    weight = model.patch_embed.proj.weight.detach().float()
    filters = weight.flatten(1)
    centred = filters - filters.mean(dim=0)
    _, singular, components = torch.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    count = min(count, components.shape[0])
    return components[:count].reshape(count, *weight.shape[1:]), (variance / variance.sum())[:count]


def plot_position_similarity(similarity: torch.Tensor, path: str | Path) -> Path:
    """PNG: for each patch (tile at its row and column), the cosine similarity of its position embedding to all."""
    side = similarity.shape[0]
    step = side + 1  # one blank pixel between tiles
    mosaic = torch.full((side * step - 1, side * step - 1), float("nan"))
    for r in range(side):
        for c in range(side):
            mosaic[r * step : r * step + side, c * step : c * step + side] = similarity[r, c]
    fig = new_figure(5.6, 4.8)
    ax = fig.add_subplot()
    shown = ax.imshow(mosaic.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ticks = [i * step + (side - 1) / 2 for i in range(side)]
    ax.set_xticks(ticks, [str(i + 1) for i in range(side)], fontsize=7)
    ax.set_yticks(ticks, [str(i + 1) for i in range(side)], fontsize=7)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_facecolor("white")
    fig.colorbar(shown, ax=ax, label="cosine similarity", shrink=0.8)
    ax.set_title("Position embedding similarity", fontsize=10)
    return save_figure(fig, path)


def plot_patch_components(components: torch.Tensor, explained: torch.Tensor, path: str | Path) -> Path:
    """PNG: the principal components of the patch-embedding filters, each scaled to its own range (RGB)."""
    count = len(components)
    cols = min(count, 7)
    rows = math.ceil(count / cols)
    fig = new_figure(1.3 * cols, 1.45 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    shown = to_unit_range(components.flatten(1)[:, None]).reshape(components.shape).cpu()
    for ax in axes.flat:
        ax.axis("off")
    for i, (component, share) in enumerate(zip(shown, explained)):
        image = component.permute(1, 2, 0).numpy()
        ax = axes.flat[i]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", interpolation="nearest")
        ax.set_title(f"PC {i + 1}: {100 * share:.1f} %", fontsize=7)
    fig.suptitle("Patch-embedding filters: principal components (share of variance)", fontsize=10)
    return save_figure(fig, path)
