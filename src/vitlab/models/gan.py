"""CycleGAN's CNNs: the 70×70 PatchGAN discriminator and the ResNet generator (the CNN baseline).

Architectures and defaults follow Isola et al. 2017 (pix2pix, the PatchGAN) and Zhu et al. 2017
(CycleGAN, the ResNet-9-block generator of its 256 px experiments): instance normalisation without
affine parameters (so every convolution keeps its bias), reflection padding in the generator, and
weights drawn from N(0, 0.02) with zero biases.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.config import NORMS
from vitlab.errors import VitlabError, check_choice


def norm_layer(kind: str, channels: int) -> nn.Module:
    """InstanceNorm without affine parameters or running statistics (CycleGAN's), or nothing."""
    return nn.InstanceNorm2d(channels) if kind == "instance" else nn.Identity()


def init_gan_weights(module: nn.Module) -> None:
    """CycleGAN's `normal` init: convolution weights from N(0, 0.02), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResnetBlock(nn.Module):
    """x + (pad, conv 3×3, norm, ReLU, pad, conv 3×3, norm)(x), with reflection padding."""

    def __init__(self, channels: int, norm: str = "instance", dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            norm_layer(norm, channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            norm_layer(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's generator: 7×7 stem, two stride-2 downsamplings, residual blocks, two upsamplings, tanh.

    The default (64 base channels, 9 blocks) is the 256 px generator of Zhu et al. 2017 with
    11,378,179 parameters; their 128 px generator has 6 blocks.
    """

    def __init__(
        self,
        in_chans: int = 3,
        out_chans: int = 3,
        base_channels: int = 64,
        num_blocks: int = 9,
        norm: str = "instance",
        dropout: float = 0.0,
    ):
        super().__init__()
        check_choice("norm", norm, NORMS)
        if base_channels < 1 or num_blocks < 0:
            raise VitlabError(f"base_channels={base_channels} must be >= 1 and num_blocks={num_blocks} >= 0")
        c = base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_chans, c, 7, padding=3, padding_mode="reflect"),
            norm_layer(norm, c),
            nn.ReLU(inplace=True),
        ]
        for width in (c, 2 * c):
            layers += [
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                norm_layer(norm, 2 * width),
                nn.ReLU(inplace=True),
            ]
        layers += [ResnetBlock(4 * c, norm, dropout) for _ in range(num_blocks)]
        for width in (4 * c, 2 * c):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1),
                norm_layer(norm, width // 2),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.Conv2d(c, out_chans, 7, padding=3, padding_mode="reflect"), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_gan_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise VitlabError(f"the ResNet generator needs image sides divisible by 4, got {tuple(x.shape[-2:])}")
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: a map of real/fake scores, each seeing one 70×70 patch (with 3 stride-2 layers).

    Stride-2 4×4 convolutions widen 64 → 128 → 256, then two stride-1 4×4 convolutions give 512
    channels and the raw score (no sigmoid: the LSGAN loss takes it as is). No norm after the first
    convolution; LeakyReLU 0.2 throughout.
    """

    def __init__(self, in_chans: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "instance"):
        super().__init__()
        check_choice("norm", norm, NORMS)
        if num_layers < 1:
            raise VitlabError(f"num_layers={num_layers} must be >= 1")
        widths = [base_channels * min(2**i, 8) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_chans, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1),
                norm_layer(norm, widths[i]),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        init_gan_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
