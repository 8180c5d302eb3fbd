"""Models in plain torch.nn: blocks, the ViT, presets and loaders for foreign checkpoints."""

from vitlab.models.presets import FAMILIES, SIZES, count_parameters, create_model, preset_config
from vitlab.models.vit import VisionTransformer

__all__ = ["SIZES", "FAMILIES", "VisionTransformer", "count_parameters", "create_model", "preset_config"]
