"""Every inspection picture of one model at once: what `vitlab inspect` writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vitlab.data.augment import normalize
from vitlab.errors import VitlabError
from vitlab.inspection.attention import (
    Query,
    attention_maps,
    attention_rollout,
    default_query,
    plot_attention_maps,
    plot_rollout,
    query_attention,
)
from vitlab.inspection.distance import mean_attention_distance, plot_mean_attention_distance
from vitlab.inspection.embeddings import (
    patch_embedding_components,
    plot_patch_components,
    plot_position_similarity,
    position_embedding_similarity,
)
from vitlab.models.vit import PatchEmbed, VisionTransformer


def inspect_model(
    model: VisionTransformer,
    images: torch.Tensor,
    out_dir: str | Path,
    query: Query | None = None,
    components: int = 28,
    *,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Path]:
    """Write the inspection PNGs of `model` on uint8 `images` (B, C, H, W) into `out_dir`; returns them by name.

    `query` defaults to the class token, or to the mean over queries for a model without one; a hybrid's
    patch embedding has no pixel filters to draw.
    """
    if not isinstance(model, VisionTransformer):
        raise VitlabError(
            f"vitlab inspect draws a ViT's attention and embeddings, which a {type(model).__name__} has not; "
            "compare its layers with another run's by `vitlab cka RUN_A RUN_B`"
        )
    out_dir = Path(out_dir)
    query = default_query(model) if query is None else query
    device = next(model.parameters()).device
    maps = attention_maps(model, normalize(images, mean, std).to(device)).cpu()
    prefix, patch = model.num_prefix_tokens, model.patch_embed.patch_size
    per_head = query_attention(maps, prefix, query)
    written = {
        f"attention_{i}": plot_attention_maps(image, per_head[:, i], query, out_dir / f"attention_image{i}.png")
        for i, image in enumerate(images)
    }
    written["rollout"] = plot_rollout(images, attention_rollout(maps, prefix, query), query, out_dir / "rollout.png")
    written["attention_distance"] = plot_mean_attention_distance(
        mean_attention_distance(maps, prefix, patch), images.shape[-1], out_dir / "attention_distance.png"
    )
    written["position_similarity"] = plot_position_similarity(
        position_embedding_similarity(model), out_dir / "position_similarity.png"
    )
    if isinstance(model.patch_embed, PatchEmbed):  # pixel filters (a hybrid's 1×1 projection of ResNet features is not)
        written["patch_components"] = plot_patch_components(
            *patch_embedding_components(model, components), out_dir / "patch_embedding_pcs.png"
        )
    return written
