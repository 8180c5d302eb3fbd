"""Mean attention distance per layer and head (Dosovitskiy et al. 2021, Fig. 7 right): the ViT's receptive field."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vitlab.figures import new_figure, save_figure


def patch_distances(side: int, patch_size: int) -> torch.Tensor:
    """Pixel distances between the centres of the patches of a side × side grid: (side², side²), row-major."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres).float()


def mean_attention_distance(maps: torch.Tensor, num_prefix_tokens: int, patch_size: int) -> torch.Tensor:
    """Mean attention distance in pixels per layer and head: (layers, heads), averaged over images and query patches.

    For each query patch, the distance to every key patch weighted by the attention it pays that key;
    prefix tokens (the class token) have no place in the image, so they are left out on both sides
    and each row's weights over the patches are renormalised to sum to one.
    """
    patches = maps[..., num_prefix_tokens:, num_prefix_tokens:].float()
    weights = patches / patches.sum(dim=-1, keepdim=True)
    distances = patch_distances(math.isqrt(patches.shape[-1]), patch_size).to(weights.device)
    return (weights * distances).sum(dim=-1).mean(dim=(1, 3))


def plot_mean_attention_distance(distance: torch.Tensor, image_size: int, path: str | Path) -> Path:
    """PNG: one dot per head, mean attention distance (pixels) against layer, as in the ViT paper's Fig. 7."""
    layers, heads = distance.shape
    fig = new_figure(5.0, 3.6)
    ax = fig.add_subplot()
    spread = torch.linspace(-0.15, 0.15, heads) if heads > 1 else torch.zeros(1)  # heads side by side
    for head in range(heads):
        x = (torch.arange(1, layers + 1) + spread[head]).numpy()
        ax.scatter(x, distance[:, head].cpu().numpy(), s=22, label=f"head {head + 1}")
    ax.set_xlabel("layer (network depth)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(range(1, layers + 1))
    ax.set_ylim(0, image_size)
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=7, ncol=2 if heads > 6 else 1, loc="upper left")
    ax.set_title(f"Mean attention distance per head ({image_size} px image)", fontsize=10)
    return save_figure(fig, path)
