"""BiT ResNets (ResNetV2; Kolesnikov et al. 2020, "Big Transfer"): GroupNorm and weight-standardised convolutions,
pre-activation bottlenecks (He et al. 2016), or post-activation ones for the ViT paper's hybrid stem.

Tensor names are timm's (timm/models/resnetv2.py: stem.conv, stages.S.blocks.U.{norm1, conv1, norm2, conv2,
norm3, conv3, downsample.conv}, norm, head.fc), so that timm's BiT checkpoints load as they are.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError, check_choice
from vitlab.models.blocks import DropPath

# bit: 7×7/2 convolution and 3×3/2 max-pool (stride 4); same: the same with TensorFlow's "SAME" padding in every
# strided convolution and the pool (the ViT paper's hybrids; timm's StdConv2dSame); small: one 3×3/1 convolution.
STEMS = ("bit", "same", "small")


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) as TensorFlow's "SAME" does: ceil(size / stride) outputs, the odd pixel at the end."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class MaxPoolSame(nn.MaxPool2d):
    """3×3/2 max-pool with TensorFlow's "SAME" padding (by −inf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, float("-inf")))


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation per output filter (Qiao et al. 2019), no bias, as BiT uses.

    eps = 1e-8 and padding ((stride − 1) + (kernel − 1)) // 2 are timm's for BiT (`_create_resnetv2_bit`, `get_padding`).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_chs, out_chs, kernel_size, stride, padding=(stride - 1 + kernel_size - 1) // 2, bias=False)
        self.eps, self.same = eps, False

    def pad_same(self) -> None:
        """Pad as TensorFlow's "SAME" from now on (timm's StdConv2dSame), by the input's size at each call."""
        self.same, self.padding = True, (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), unbiased=False, keepdim=True)
        return self._conv_forward(x, (self.weight - mean) / torch.sqrt(var + self.eps), None)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (eps 1e-5), then ReLU unless `act` is off (timm's GroupNormAct)."""

    def __init__(self, channels: int, groups: int, act: bool = True):
        if channels % groups:
            raise VitlabError(
                f"GroupNorm of {channels} channels in {groups} groups: the channels must divide evenly; "
                "set model.options.groups to a divisor of every width (BiT uses 32)"
            )
        super().__init__(groups, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


def downsample(in_chs: int, out_chs: int, stride: int, preact: bool, groups: int) -> nn.Module:
    """The projection shortcut of a stage's first unit: a 1×1 convolution (and, without pre-activation, a norm)."""
    layers = OrderedDict(conv=StdConv2d(in_chs, out_chs, 1, stride))
    if not preact:
        layers["norm"] = GroupNormAct(out_chs, groups, act=False)
    return nn.Sequential(layers)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: norm-ReLU-conv three times (1×1, 3×3 with the stride, 1×1), plus the shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, groups: int = 32, drop_path: float = 0.0):
        super().__init__()
        mid = out_chs // 4
        project = stride != 1 or in_chs != out_chs
        self.downsample = downsample(in_chs, out_chs, stride, True, groups) if project else None
        self.norm1, self.conv1 = GroupNormAct(in_chs, groups), StdConv2d(in_chs, mid, 1)
        self.norm2, self.conv2 = GroupNormAct(mid, groups), StdConv2d(mid, mid, 3, stride)
        self.norm3, self.conv3 = GroupNormAct(mid, groups), StdConv2d(mid, out_chs, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(x_preact)))))
        return self.drop_path(x) + shortcut

    def zero_init_last(self) -> None:
        """Start as the shortcut alone: the last convolution's weights zero (timm's `zero_init_last`)."""
        nn.init.zeros_(self.conv3.weight)


class Bottleneck(nn.Module):
    """Post-activation bottleneck (the ViT paper's hybrid stem): conv-norm three times, ReLU after the sum."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, groups: int = 32, drop_path: float = 0.0):
        super().__init__()
        mid = out_chs // 4
        project = stride != 1 or in_chs != out_chs
        self.downsample = downsample(in_chs, out_chs, stride, False, groups) if project else None
        self.conv1, self.norm1 = StdConv2d(in_chs, mid, 1), GroupNormAct(mid, groups)
        self.conv2, self.norm2 = StdConv2d(mid, mid, 3, stride), GroupNormAct(mid, groups)
        self.conv3, self.norm3 = StdConv2d(mid, out_chs, 1), GroupNormAct(out_chs, groups, act=False)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm3(self.conv3(self.norm2(self.conv2(self.norm1(self.conv1(x))))))
        return F.relu(self.drop_path(x) + shortcut)

    def zero_init_last(self) -> None:
        """Start as ReLU(shortcut): the last norm's scale zero (Goyal et al. 2017; timm's `zero_init_last`)."""
        nn.init.zeros_(self.norm3.weight)


class ResNetStage(nn.Module):
    """Units of one width; the first one strides and projects the shortcut."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int, preact: bool, groups: int, drop_paths: list[float]):
        super().__init__()
        unit = PreActBottleneck if preact else Bottleneck
        self.blocks = nn.Sequential(
            *(unit(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, groups, drop_paths[i]) for i in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """Global average pool, then a 1×1 convolution to the classes (timm's `head.fc` with use_conv=True)."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Conv2d(features, num_classes, 1) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3), keepdim=True)).flatten(1)


class ResNetV2(nn.Module):
    """BiT ResNet classifier; with `num_classes=0` a feature extractor (pooled features, or `forward_features` maps)."""

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        layers: Sequence[int] = (3, 4, 6, 3),
        channels: Sequence[int] = (256, 512, 1024, 2048),
        width_factor: int = 1,
        stem_width: int = 64,
        stem: str = "bit",
        preact: bool = True,
        groups: int = 32,
        drop_path: float = 0.0,
        zero_head: bool = False,
        grad_checkpointing: bool = False,
        zero_init_last: bool = False,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_choice("stem", stem, STEMS)
        if len(layers) != len(channels) or not layers or min(layers) < 1:
            raise VitlabError(f"layers={list(layers)} and channels={list(channels)}: give one positive depth per stage width")
        if num_classes < 0:
            raise VitlabError(f"num_classes={num_classes} is negative; use 0 for no head or the number of classes")
        self.num_classes, self.zero_head, self.grad_checkpointing = num_classes, zero_head, grad_checkpointing
        self.zero_init_last = zero_init_last
        stem_chs = stem_width * width_factor
        parts = OrderedDict(conv=StdConv2d(in_chans, stem_chs, 3) if stem == "small" else StdConv2d(in_chans, stem_chs, 7, 2))
        if not preact:
            parts["norm"] = GroupNormAct(stem_chs, groups)
        if stem == "bit":  # BiT's "fixed" padding: pad by 1, then pool without padding (timm's stem_type='fixed')
            parts |= OrderedDict(pad=nn.ConstantPad2d(1, 0.0), pool=nn.MaxPool2d(3, stride=2))
        elif stem == "same":
            parts["pool"] = MaxPoolSame(3, stride=2)
        self.stem = nn.Sequential(parts)
        total = sum(layers)  # stochastic depth rising linearly over the units, 0 to drop_path
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(layers[:i]) for i in range(len(layers))]
        widths = [c * width_factor for c in channels]
        self.stages = nn.Sequential(
            *(
                ResNetStage(([stem_chs] + widths)[i], widths[i], depth, 1 if i == 0 else 2, preact, groups, rates[starts[i] :])
                for i, depth in enumerate(layers)
            )
        )
        if stem == "same":
            for module in self.modules():
                if isinstance(module, StdConv2d):
                    module.pad_same()
        self.stride = (1 if stem == "small" else 4) * 2 ** (len(layers) - 1)
        self.num_features = widths[-1]
        self.norm = GroupNormAct(self.num_features, groups) if preact else nn.Identity()
        self.head = ClassifierHead(self.num_features, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ResNetV2 init: Kaiming-normal (fan out) convolutions, unit GroupNorms, each unit's last layer zero
        if `zero_init_last`, the head by `init_head`."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not getattr(self.head, "fc", None):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.zero_init_last:  # after the loop above, which visits a unit before its layers
            for module in self.modules():
                if isinstance(module, (PreActBottleneck, Bottleneck)):
                    module.zero_init_last()
        self.init_head(self.zero_head)

    def init_head(self, zero: bool) -> None:
        """N(0, 0.01) weights and zero bias (timm), or all zeros (BiT fine-tunes from a zero head)."""
        if isinstance(self.head.fc, nn.Conv2d):
            if zero:
                nn.init.zeros_(self.head.fc.weight)
            else:
                nn.init.normal_(self.head.fc.weight, std=0.01)
            nn.init.zeros_(self.head.fc.bias)

    def reset_head(self, num_classes: int, zero: bool | None = None) -> None:
        """A new head for `num_classes` (0: none), initialised as at build, all zeros if `zero` (default: `zero_head`)."""
        if num_classes < 0:
            raise VitlabError(f"num_classes={num_classes} is negative; use 0 for no head or the number of classes")
        like = self.stem.conv.weight
        self.num_classes = self.config["num_classes"] = num_classes
        self.head = ClassifierHead(self.num_features, num_classes).to(like.device, like.dtype)
        self.init_head(self.zero_head if zero is None else zero)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images → the last stage's feature map (B, C, H/stride, W/stride), normalised when pre-activated."""
        x = self.stem(x)
        for stage in self.stages:
            for unit in stage.blocks:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(unit, x, use_reentrant=False)
                else:
                    x = unit(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def stem_stages(layers: Sequence[int], stride: int) -> list[int]:
    """The first stages of a ResNet with a stride-4 stem that reach `stride`, the removed stages' units moved into
    the last one kept (the ViT paper's hybrid: R50's (3, 4, 6, 3) at stride 16 becomes (3, 4, 9))."""
    kept = int(math.log2(stride)) - 1 if stride >= 4 and stride & (stride - 1) == 0 else 0
    if not 1 <= kept <= len(layers):
        strides = ", ".join(str(4 * 2**i) for i in range(len(layers)))
        raise VitlabError(f"a hybrid's patch size is its ResNet stem's stride: one of {strides}, not {stride}")
    return [*layers[: kept - 1], sum(layers[kept - 1 :])]
