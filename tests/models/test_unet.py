"""ViTUnet: shapes, parameter counts beside the paper's Table 2, token-grid resampling, switches."""

import pytest
import torch

from vitlab import VitlabError
from vitlab.models.blocks import ParallelBlock, SerialBlock
from vitlab.models.unet import ViTUnet, count_unet_parameters, create_unet, downsample_tokens, upsample_tokens

TINY = dict(embed_dim=32, depth=6, num_heads=2, mlp_dim=64, refine_channels=8, refine_blocks=1)


def test_output_is_an_image_of_the_input_size_in_tanh_range():
    model = create_unet("vit-ti/4", img_size=32, **TINY)
    y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 3, 32, 32) and y.abs().max() < 1


@pytest.mark.parametrize("levels,grids", [(1, [8, 4, 8]), (2, [8, 4, 2, 4, 8])])
def test_stages_run_on_grids_halved_then_doubled(levels, grids):
    model = create_unet("vit-ti/4", img_size=32, levels=levels, **TINY)
    stages = [*model.encoder, model.bottleneck, *model.decoder]
    seen = []
    for stage in stages:
        stage.register_forward_hook(lambda module, args, out: seen.append((args[0].shape[1], out.shape[2])))
    model(torch.randn(1, 3, 32, 32))
    assert seen == [(g * g, 32) for g in grids]  # token count changes, width does not


def test_downsampling_averages_2x2_neighbours_of_the_token_grid():
    grid = torch.arange(16.0).view(4, 4)  # token (i, j) holds 4i + j in every channel
    tokens = grid.flatten()[None, :, None].expand(1, 16, 5)
    down = downsample_tokens(tokens)
    assert down.shape == (1, 4, 5)  # the width is kept: the channel axis is not resampled
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).flatten()
    assert torch.equal(down[0, :, 0], expected) and torch.equal(down[0], down[0, :, :1].expand(4, 5))


def test_resampling_leaves_each_tokens_channels_alone():
    # A token vector that is the same at every grid position must come back unchanged;
    # resampling the channel axis (the paper's code) would change it.
    channels = torch.randn(7)
    tokens = channels.expand(1, 64, 7)
    assert torch.allclose(downsample_tokens(tokens), channels.expand(1, 16, 7))
    assert torch.allclose(upsample_tokens(tokens), channels.expand(1, 256, 7))


def test_upsampling_interpolates_the_token_grid():
    grid = torch.arange(16.0).view(4, 4)  # a linear ramp over the grid, the same in every channel
    tokens = grid.flatten()[None, :, None].expand(2, 16, 3)
    up = upsample_tokens(tokens)
    assert up.shape == (2, 64, 3)
    # Bilinear interpolation reproduces a ramp away from the border: each 2x2 child block averages to its parent.
    back = downsample_tokens(up)[0, :, 0].view(4, 4)
    assert torch.allclose(back[1:3, 1:3], grid[1:3, 1:3])


# Paper Table 2: ViT-S/32 12 M, ViT-22B-S/32 12 M, ViT-B/32 44 M generator parameters at 256 px.
@pytest.mark.parametrize("name,paper", [("vit-s/32", 12e6), ("vit22b-s/32", 12e6), ("vit-b/32", 44e6)])
def test_table_2_parameter_counts_within_12_percent_of_the_paper(name, paper):
    count = count_unet_parameters(name, img_size=256)
    assert 1.0 <= count / paper < 1.12


def test_parameter_count_is_blocks_plus_embedding_fusion_head_and_refiner():
    d, p, c, grid = 384, 32, 32, 8
    block = 4 * d * d + 8 * d * d + 9 * d + 4 * d  # qkv + proj, fc1 + fc2 (MLP 4d), their biases, two LayerNorms
    embed = 3 * p * p * d + d + grid * grid * d
    fuse = 2 * d * d + d
    head = d * 3 * p * p + 3 * p * p + 2 * d  # linear + final LayerNorm
    refiner = (3 * c * 9 + c) + 2 * 2 * (c * c * 9 + c) + (c * 3 * 9 + 3)
    assert count_unet_parameters("vit-s/32", img_size=256) == 6 * block + embed + fuse + head + refiner


def test_vit22b_backbone_uses_parallel_blocks_with_the_switches():
    model = create_unet("vit22b-ti/4", img_size=32, branch_norm="mlp", **TINY)
    blocks = [m for m in model.modules() if isinstance(m, (SerialBlock, ParallelBlock))]
    assert len(blocks) == 3 and all(isinstance(b, ParallelBlock) for b in blocks)
    assert all(b.branch_norm_kind == "mlp" and b.qkv_bias is None for b in blocks)


def test_input_skip_feeds_the_image_to_the_refiner():
    plain, skip = (create_unet("vit-ti/4", img_size=32, input_skip=s, **TINY) for s in (False, True))
    assert skip.refine.stem.in_channels == 6 and plain.refine.stem.in_channels == 3


def test_grid_that_cannot_halve_is_an_error_naming_levels():
    with pytest.raises(VitlabError, match="levels=3"):
        ViTUnet(img_size=32, patch_size=8, levels=3, **TINY)


def test_unknown_option_lists_the_allowed_ones():
    with pytest.raises(VitlabError, match="unknown ViTUnet option.*pool.*allowed:.*levels"):
        create_unet("vit-s/32", pool="gap")
