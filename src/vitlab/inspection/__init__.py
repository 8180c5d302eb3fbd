"""Inspecting what a ViT learned (the ViT lecture): attention maps and rollout, attention distances, embeddings, CKA.

Every function returns tensors (for notebooks); the `plot_*` functions and `inspect_model` write PNGs.
"""

from vitlab.inspection.attention import attention_maps, attention_rollout, default_query, query_attention
from vitlab.inspection.cka import compare_models, linear_cka
from vitlab.inspection.distance import mean_attention_distance, patch_distances
from vitlab.inspection.embeddings import patch_embedding_components, position_embedding_similarity
from vitlab.inspection.pictures import inspect_model

__all__ = [
    "attention_maps",
    "attention_rollout",
    "compare_models",
    "default_query",
    "inspect_model",
    "linear_cka",
    "mean_attention_distance",
    "patch_distances",
    "patch_embedding_components",
    "position_embedding_similarity",
    "query_attention",
]
