"""CycleGAN's CNNs: PatchGAN receptive field and parameter counts, ResNet generator shapes and counts."""

import pytest
import torch

from vitlab import VitlabError
from vitlab.models.gan import PatchDiscriminator, ResnetGenerator
from vitlab.models.presets import meta_parameter_count


def receptive_field(model: torch.nn.Module, size: int = 160) -> tuple[int, int]:
    """Height and width of the input region that one central output pixel depends on (by its gradient)."""
    x = torch.randn(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    out = model.double()(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows, cols = (x.grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_patchgan_sees_70x70_patches():
    # InstanceNorm mixes every position of an image, so the field is measured without it.
    assert receptive_field(PatchDiscriminator(norm="none")) == (70, 70)


def test_patchgan_with_two_stride2_layers_sees_34x34():
    assert receptive_field(PatchDiscriminator(num_layers=2, norm="none")) == (34, 34)


def test_patchgan_outputs_a_raw_score_map():
    scores = PatchDiscriminator()(torch.randn(2, 3, 256, 256))
    assert scores.shape == (2, 1, 30, 30)  # pix2pix's 30x30 map at 256 px
    assert scores.min() < 0 < scores.max()  # no sigmoid: LSGAN takes the raw output


def test_parameter_counts_match_cyclegan():
    # The CycleGAN code prints 2.765 M for D and 11.378 M for the 9-block G (Zhu et al. 2017).
    assert meta_parameter_count(PatchDiscriminator) == 2_764_737
    assert meta_parameter_count(ResnetGenerator) == 11_378_179


def test_resnet_generator_keeps_the_shape_and_range():
    generator = ResnetGenerator(base_channels=8, num_blocks=2)
    y = generator(torch.randn(2, 3, 36, 44))
    assert y.shape == (2, 3, 36, 44) and y.abs().max() <= 1


def test_resnet_generator_refuses_sides_not_divisible_by_4():
    with pytest.raises(VitlabError, match="divisible by 4"):
        ResnetGenerator(base_channels=8, num_blocks=1)(torch.randn(1, 3, 30, 32))


def test_bad_norm_names_the_allowed_values():
    with pytest.raises(VitlabError, match="norm='batch'.*'instance', 'none'"):
        PatchDiscriminator(norm="batch")
