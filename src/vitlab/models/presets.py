"""Model presets by name (`vit-s/16`, `vit22b-b/32`, `ai602-vit22b-b/16`, `bit-r50x1`, `hybrid-r50-vit-b/16`, …),
`create_model`, meta-device counts."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitlab.errors import VitlabError
from vitlab.models.ai602 import Ai602ViT
from vitlab.models.hybrid import HybridViT
from vitlab.models.resnet import ResNetV2, stem_stages
from vitlab.models.vit import VisionTransformer


@dataclass(frozen=True)
class Size:
    """Depth, width, MLP width and heads of one model size."""

    depth: int
    width: int
    mlp_dim: int
    heads: int


# Ti/S/B/L/H: Dosovitskiy et al. 2021 Table 1 and Touvron et al. 2021 (DeiT) for Ti and S;
# g and G: Zhai et al. 2022 ("Scaling Vision Transformers") Table 2;
# 22B: Dehghani et al. 2023 Table 1 (48 layers, width 6144, MLP 24576, 48 heads).
SIZES: dict[str, Size] = {
    "Ti": Size(12, 192, 768, 3),
    "S": Size(12, 384, 1536, 6),
    "B": Size(12, 768, 3072, 12),
    "L": Size(24, 1024, 4096, 16),
    "H": Size(32, 1280, 5120, 16),
    "g": Size(40, 1408, 6144, 16),
    "G": Size(48, 1664, 8192, 16),
    "22B": Size(48, 6144, 24576, 48),
}

# The ViT-22B block (Dehghani et al. 2023, Sec. 2): parallel layers, QK LayerNorm,
# no bias in the QKV projection nor in the LayerNorms.
FAMILIES: dict[str, dict] = {
    "vit": dict(block="serial"),
    "vit22b": dict(block="parallel", qk_norm=True, qkv_bias=False, norm_bias=False),
}

# The paper's code (HongSungRae/ai602 @ 63e7ad0: models/vit.py, models/vit22b.py), rebuilt in vitlab.models.ai602;
# its models/model_config.json uses the Ti/S/B/L/H sizes above, with the same numbers.
AI602_FAMILIES: dict[str, dict] = {
    "ai602-vit": dict(block="serial"),
    "ai602-vit22b": dict(block="parallel", head_batchnorm=True),
}

# BiT ResNets (Kolesnikov et al. 2020; timm's resnetv2_{50,101,152}x{1,3}_bit): bottleneck units per stage,
# depth = 3 · units + 2; R26 (timm's resnet26 layout) is the small one for CPUs. `bit-r50x1` is R50 at width 1.
RESNET_LAYERS: dict[int, tuple[int, ...]] = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
RESNET_CHANNELS = (256, 512, 1024, 2048)
_RESNET = re.compile(r"^bit-r(?P<depth>\d+)x(?P<width>\d+)$")
# The ViT paper's hybrids: `hybrid-r50-vit-b/16` is R50+ViT-B/16, the patch size being the ResNet stem's stride.
_HYBRID = re.compile(r"^hybrid-r(?P<depth>\d+)-(?P<vit>.+)$")
_NAME = re.compile(r"^(?P<family>[a-z0-9-]+)-(?P<size>[A-Za-z0-9]+)/(?P<patch>\d+)$")


def lookup_size(size: str) -> str:
    """Canonical size key: exact match first (so `g` and `G` stay apart), then case-insensitive."""
    if size in SIZES:
        return size
    matches = [key for key in SIZES if key.lower() == size.lower() and key not in ("g", "G")]
    if len(matches) != 1:
        raise VitlabError(f"unknown model size {size!r}; allowed: {', '.join(SIZES)} (g and G are case-sensitive)")
    return matches[0]


def parse_name(name: str) -> tuple[str, str, int]:
    """A preset name such as `vit22b-s/16` as (family, canonical size key, patch size)."""
    families = {**FAMILIES, **AI602_FAMILIES}
    match = _NAME.match(name.strip())
    if not match:
        raise VitlabError(
            f"cannot read model name {name!r}; expected FAMILY-SIZE/PATCH such as 'vit-s/16' or 'vit22b-b/32' "
            f"(families: {', '.join(families)}; sizes: {', '.join(SIZES)})"
        )
    family = match["family"].lower()
    if family not in families:
        raise VitlabError(f"unknown model family {match['family']!r} in {name!r}; allowed: {', '.join(families)}")
    return family, lookup_size(match["size"]), int(match["patch"])


def resnet_layers(depth: str, name: str) -> tuple[int, ...]:
    """The units per stage of the BiT ResNet of `depth` layers."""
    if int(depth) not in RESNET_LAYERS:
        raise VitlabError(f"unknown ResNet depth {depth} in {name!r}; allowed: {', '.join(f'r{d}' for d in RESNET_LAYERS)}")
    return RESNET_LAYERS[int(depth)]


def is_convnet(name: str) -> bool:
    """Whether a preset name is a BiT ResNet (`bit-…`) or a hybrid (`hybrid-…`), not a plain ViT."""
    return name.strip().lower().startswith(("bit-", "hybrid-"))


def preset_config(name: str) -> dict:
    """Turn a preset name such as `vit22b-s/16` into the keyword arguments of its model class."""
    lowered = name.strip().lower()
    if resnet := _RESNET.match(lowered):
        return dict(layers=resnet_layers(resnet["depth"], name), width_factor=int(resnet["width"]))
    if hybrid := _HYBRID.match(lowered):
        if is_ai602(hybrid["vit"]) or is_convnet(hybrid["vit"]):
            raise VitlabError(f"{name!r}: a hybrid's ViT is a vit-… or vit22b-… preset, e.g. hybrid-r50-vit-b/16")
        vit = preset_config(hybrid["vit"])
        stages = stem_stages(resnet_layers(hybrid["depth"], name), vit["patch_size"])
        return dict(vit, stem_layers=stages, stem_channels=RESNET_CHANNELS[: len(stages)])
    if lowered.startswith("bit-"):
        raise VitlabError(f"cannot read ResNet name {name!r}; expected bit-rDEPTHxWIDTH such as bit-r50x1")
    family, key, patch = parse_name(name)
    size = SIZES[key]
    return dict(
        patch_size=patch,
        embed_dim=size.width,
        depth=size.depth,
        mlp_dim=size.mlp_dim,
        num_heads=size.heads,
        **{**FAMILIES, **AI602_FAMILIES}[family],
    )


def is_ai602(name: str) -> bool:
    """Whether a preset name belongs to the paper code's models (`ai602-…`)."""
    return name.strip().lower().startswith(tuple(f"{family}-" for family in AI602_FAMILIES))


def model_class(name: str = "vit-s/16") -> type[nn.Module]:
    """The class a preset name builds: VisionTransformer, Ai602ViT (`ai602-…`), ResNetV2 (`bit-…`), HybridViT (`hybrid-…`)."""
    lowered = name.strip().lower()
    if lowered.startswith("bit-"):
        return ResNetV2
    if lowered.startswith("hybrid-"):
        return HybridViT
    return Ai602ViT if is_ai602(name) else VisionTransformer


def model_options(name: str = "vit-s/16") -> list[str]:
    """Names of every keyword that `create_model(name, …)` accepts as an override (a hybrid's: its stem's and the ViT's)."""
    cls = model_class(name)
    own = [p.name for p in inspect.signature(cls).parameters.values() if p.kind != p.VAR_KEYWORD]
    return own + [p for p in inspect.signature(VisionTransformer).parameters if p not in own] if cls is HybridViT else own


def create_model(name: str, **overrides) -> nn.Module:
    """Build a preset by name; any keyword of its model class overrides the preset's value."""
    unknown = sorted(set(overrides) - set(model_options(name)))
    if unknown:
        raise VitlabError(f"unknown model option(s) {', '.join(unknown)}; allowed: {', '.join(model_options(name))}")
    return model_class(name)(**{**preset_config(name), **overrides})


def meta_parameter_count(build: Callable[[], torch.nn.Module]) -> int:
    """Parameter count of the model `build()` returns, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def counted_model(name: str, img_size: int = 224, in_chans: int = 3, **overrides) -> tuple[int, int]:
    """Parameters and forward FLOPs of one image (2 per multiply-add of convolutions and matrix products) of a preset,
    built on the meta device and counted by PyTorch's FlopCounterMode; attention is counted on its explicit matmuls."""
    if "attn_impl" in model_options(name):
        overrides["attn_impl"] = "matmul"  # SDPA's CPU kernel has no FLOP formula
    with torch.device("meta"):
        model = create_model(name, img_size=img_size, in_chans=in_chans, **overrides)
        images = torch.empty(1, in_chans, img_size, img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def forward_flops(name: str, img_size: int = 224, in_chans: int = 3, **overrides) -> int:
    """Forward FLOPs of one image of a preset (`counted_model`)."""
    return counted_model(name, img_size, in_chans, **overrides)[1]


def count_parameters(name: str, **overrides) -> int:
    """Parameter count of a preset, built on the meta device (no memory is allocated)."""
    return meta_parameter_count(lambda: create_model(name, **overrides))


def parameter_table(img_size: int = 224, patch_size: int = 16, num_classes: int = 1000) -> list[dict]:
    """Table 1 of the paper: every size with its ViT and ViT-22B-style parameter counts."""
    rows = []
    for key, size in SIZES.items():
        counts = {
            family: count_parameters(f"{family}-{key}/{patch_size}", img_size=img_size, num_classes=num_classes)
            for family in FAMILIES
        }
        rows.append(dict(size=key, depth=size.depth, width=size.width, mlp_dim=size.mlp_dim, heads=size.heads, **counts))
    return rows


CONVNET_PRESETS = ("bit-r26x1", "bit-r50x1", "bit-r101x1", "hybrid-r50-vit-b/16", "hybrid-r50-vit22b-b/16", "vit-b/16")


def convnet_table(img_size: int = 224, num_classes: int = 1000) -> list[dict]:
    """Parameters and forward GFLOPs per image of the BiT ResNets and hybrids, beside ViT-B/16 (the ViT paper's Fig. 5);
    the /16 models only at image sizes that are multiples of 16."""
    rows = []
    for name in CONVNET_PRESETS:
        if not name.endswith("/16") or img_size % 16 == 0:
            params, flops = counted_model(name, img_size, num_classes=num_classes)
            rows.append(dict(name=name, params=params, gflops=flops / 1e9))
    return rows
