"""The paper code's networks (HongSungRae/ai602 @ 63e7ad0), each element pinned."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab import VitlabError, create_model
from vitlab.config import ModelConfig
from vitlab.models.ai602 import (
    Ai602Discriminator,
    Ai602ViTUnet,
    FullWidthAttention,
    PreNormBlock,
    SumNormParallelBlock,
    resize_width,
)
from vitlab.models.presets import count_parameters
from vitlab.models.unet import count_unet_parameters, create_unet
from vitlab.runs.kinds import check_model


def reference_attention(attn: FullWidthAttention, x: torch.Tensor, heads: int, qk_norm: bool) -> torch.Tensor:
    """The code's attention written out: q kᵀ · dim**-0.5 with the full width `dim`."""
    dim = x.shape[-1]
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in F.linear(x, attn.qkv.weight).chunk(3, dim=-1))
    if qk_norm:
        q, k = F.layer_norm(q, q.shape[-1:]), F.layer_norm(k, k.shape[-1:])
    weights = (torch.einsum("bhid,bhjd->bhij", q, k) * dim**-0.5).softmax(-1)
    out = torch.einsum("bhij,bhjd->bhid", weights, v).transpose(1, 2).flatten(2)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_scales_by_the_full_width_and_has_no_qkv_bias(qk_norm):
    torch.manual_seed(0)
    attn = FullWidthAttention(48, 6, qk_norm=qk_norm, attn_impl="matmul")
    x = torch.randn(2, 5, 48)
    assert attn.qkv.bias is None
    torch.testing.assert_close(attn(x), reference_attention(attn, x, 6, qk_norm))
    attn.attn_impl = "sdpa"
    torch.testing.assert_close(attn(x), reference_attention(attn, x, 6, qk_norm))


def test_vit22b_block_has_no_input_norm_and_one_non_affine_norm_on_the_sum():
    torch.manual_seed(0)
    block = SumNormParallelBlock(48, 6, 96, attn_impl="matmul")
    assert block.attn.q_norm is block.attn.k_norm  # one shared LayerNorm(head_dim) for q and k
    assert block.attn.q_norm.normalized_shape == (8,) and not block.attn.q_norm.elementwise_affine
    assert not block.norm.elementwise_affine and block.norm.normalized_shape == (48,)
    x = torch.randn(2, 5, 48) * 3 + 1  # the branches read x itself
    expected = x + F.layer_norm(reference_attention(block.attn, x, 6, True) + block.mlp(x), (48,))
    torch.testing.assert_close(block(x), expected)


def test_vit_block_is_pre_norm_with_affine_norms_and_pytorch_eps():
    block = PreNormBlock(48, 6, 96)
    assert block.norm1.elementwise_affine and block.norm1.eps == 1e-5
    x = torch.randn(2, 5, 48)
    y = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), y + block.mlp(block.norm2(y)))


def test_presets_rebuild_the_codes_classifiers():
    vit = create_model("ai602-vit-b/16", num_classes=10)
    vit22b = create_model("ai602-vit22b-b/16", num_classes=10)
    # patches (p1 p2 c) → Linear; class token + 196 positions; no final LayerNorm; MLP heads.
    assert vit.patch_embed.in_features == 768 and vit.pos_embed.shape == (1, 197, 768)
    assert [type(m) for m in vit.head] == [nn.Linear, nn.GELU, nn.Linear] and vit.head[0].out_features == 3072
    assert [type(m) for m in vit22b.head] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear]
    assert sum(isinstance(m, nn.LayerNorm) for m in vit.modules()) == 2 * 12
    assert all(not m.elementwise_affine for m in vit22b.modules() if isinstance(m, nn.LayerNorm))
    # Counted by hand from the code: embedding 590,592 + positions 151,296 + class token 768, 12 blocks, head.
    block_vit = 2 * 2 * 768 + 768 * 2304 + 768 * 769 + 768 * 3072 + 3072 + 3072 * 768 + 768
    head = 768 * 3072 + 3072 + 3072 * 10 + 10
    assert count_parameters("ai602-vit-b/16", num_classes=10) == 590_592 + 151_296 + 768 + 12 * block_vit + head == 88_162_570
    block_22b = block_vit - 2 * 2 * 768
    assert count_parameters("ai602-vit22b-b/16", num_classes=10) == 590_592 + 151_296 + 768 + 12 * block_22b + head + 2 * 3072
    assert vit22b(torch.randn(2, 3, 224, 224)).shape == (2, 10)


def test_class_token_and_position_embedding_are_standard_normal():
    torch.manual_seed(0)
    model = create_model("ai602-vit22b-s/16", num_classes=10)
    assert 0.9 < model.pos_embed.std().item() < 1.1 and model.cls_token.abs().max() > 1


def test_configs_validate_ai602_options_against_its_own_class():
    check_model(ModelConfig(name="ai602-vit22b-ti/16", options={"head_batchnorm": False}), 32)
    with pytest.raises(VitlabError, match="qk_norm"):
        check_model(ModelConfig(name="ai602-vit-ti/16", options={"qk_norm": True}), 32)


def test_resize_width_interpolates_the_channel_axis_by_nearest_neighbour():
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(resize_width(x, 0.5), x[..., ::2])
    torch.testing.assert_close(resize_width(x, 2), x.repeat_interleave(2, dim=-1))


def test_vitunet_stages_halve_the_width_and_stack_skips_along_the_tokens():
    torch.manual_seed(0)
    net = create_unet("ai602-vit-s/32", img_size=64)
    assert isinstance(net, Ai602ViTUnet)
    widths = [stage[0].norm1.normalized_shape[0] for stage in (*net.encoders, net.peak, *net.decoders)]
    assert widths == [384, 192, 96, 48, 96, 192, 384] and len(net.peak) == 2
    seen = []
    for stage in net.decoders:
        stage.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape[1:])))
    out = net(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert seen == [(8, 96), (12, 192), (16, 384)]  # N = 4 tokens → 2N, 3N, 4N
    assert out.shape == (2, 3, 64, 64) and out.abs().max() < 1
    assert net.cnn[0].in_channels == 12 and sum(type(m).__name__ == "ResnetBlock" for m in net.cnn) == 4


def test_vitunet_parameter_counts_at_256_px_beside_the_papers_12m_and_44m():
    assert count_unet_parameters("ai602-vit-s/32", img_size=256) == 13_097_219
    assert count_unet_parameters("ai602-vit22b-s/32", img_size=256) == 13_086_083
    assert count_unet_parameters("ai602-vit-b/32", img_size=256) == 43_544_387


def test_discriminator_is_the_codes_small_sigmoid_patchgan():
    d = Ai602Discriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride, c.padding) for c in convs] == [
        (3, 16, (2, 2), (2, 2)),
        (16, 32, (2, 2), (2, 2)),
        (32, 16, (2, 2), (2, 2)),
        (16, 3, (2, 2), (2, 2)),
        (3, 1, (1, 1), (1, 1)),
    ]
    out = d(torch.randn(2, 3, 256, 256))
    assert out.shape == (2, 1, 16, 16) and 0 < out.min() and out.max() < 1


def test_sum_norm_false_leaves_the_branch_sum_unnormalised():
    model = create_model("ai602-vit22b-ti/16", num_classes=10, img_size=32, depth=1, sum_norm=False)
    block = model.blocks[0]
    x = torch.randn(2, 5, 192)
    torch.testing.assert_close(block(x), x + block.attn(x) + block.mlp(x))
    with pytest.raises(VitlabError, match="sum_norm=False needs block='parallel'"):
        create_model("ai602-vit-ti/16", sum_norm=False)
