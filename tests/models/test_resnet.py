"""BiT ResNets and the ViT paper's hybrids: presets, timm's names and counts, weight standardisation, SAME padding."""

import pytest
import torch
import torch.nn.functional as F

from vitlab import VitlabError, count_parameters, create_model
from vitlab.data.builtin import make_builtin
from vitlab.models.hybrid import HybridViT
from vitlab.models.planner import flops_per_step, preset_shape
from vitlab.models.presets import forward_flops, model_options
from vitlab.models.resnet import Bottleneck, PreActBottleneck, ResNetV2, StdConv2d, pad_same, stem_stages

SMALL = dict(stem_width=16, channels=(32, 64), layers=(1, 2), groups=8)  # a two-stage R-ish net for tests


def test_parameter_counts_are_timms():
    # timm 1.0.31, num_classes=1000: resnetv2_50x1_bit, resnetv2_101x1_bit and vit_base_r50_s16_224 (R50+ViT-B/16).
    assert count_parameters("bit-r50x1", num_classes=1000) == 25_549_352
    assert count_parameters("bit-r101x1", num_classes=1000) == 44_541_480
    assert count_parameters("hybrid-r50-vit-b/16", img_size=224, num_classes=1000) == 98_659_112


def test_tensor_names_are_timms_resnetv2():
    names = set(create_model("bit-r26x1", num_classes=5, **SMALL).state_dict())
    assert {"stem.conv.weight", "stages.0.blocks.0.downsample.conv.weight", "norm.weight", "head.fc.weight"} <= names
    assert {f"stages.1.blocks.1.{n}{i}.weight" for n in ("norm", "conv") for i in (1, 2, 3)} <= names
    assert not [n for n in names if "conv" in n and n.endswith("bias")]  # standardised convolutions have no bias
    hybrid = set(create_model("hybrid-r50-vit-b/16", img_size=64, num_classes=5, depth=1).state_dict())
    assert {"patch_embed.backbone.stem.conv.weight", "patch_embed.backbone.stem.norm.weight", "patch_embed.proj.weight"} <= hybrid
    assert {
        "patch_embed.backbone.stages.2.blocks.8.norm3.weight",
        "patch_embed.backbone.stages.0.blocks.0.downsample.norm.bias",
    } <= hybrid


def test_weight_standardisation_ignores_each_filters_scale_and_offset():
    torch.manual_seed(0)
    conv, x = StdConv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([2.0, 0.5, 7.0, 1.0])[:, None, None, None]).add_(3.0)
    torch.testing.assert_close(conv(x), before, rtol=1e-4, atol=1e-4)
    assert conv(x).shape == (2, 4, 8, 8)


def test_resnet_trains_and_its_stride_and_head_follow_the_options():
    torch.manual_seed(0)
    model = create_model("bit-r26x1", img_size=32, num_classes=3, **SMALL)
    assert isinstance(model, ResNetV2) and model.stride == 8 and model.num_features == 32 * 2
    images = torch.randn(4, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (4, 3)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.reset_head(7, zero=True)
    assert model(images).shape == (4, 7) and not model(images).any()
    assert create_model("bit-r26x1", num_classes=0, stem="small", **SMALL)(images).shape == (4, 64)


def test_presets_name_their_errors():
    with pytest.raises(VitlabError, match="r26, r50, r101, r152"):
        create_model("bit-r51x1")
    with pytest.raises(VitlabError, match="bit-rDEPTHxWIDTH"):
        create_model("bit-50")
    with pytest.raises(VitlabError, match="groups"):
        create_model("bit-r26x1", stem_width=16, channels=(40, 80, 160, 320))
    with pytest.raises(VitlabError, match="unknown model option"):
        create_model("bit-r26x1", embed_dim=3)
    with pytest.raises(VitlabError, match="4, 8, 16, 32, not 12"):
        create_model("hybrid-r50-vit-b/12")
    with pytest.raises(VitlabError, match=r"stem_channels=\[32\] gives 1 width\(s\) for a stem of 2 stage"):
        create_model("hybrid-r26-vit-ti/8", img_size=32, stem_channels=[32])
    with pytest.raises(VitlabError, match="patch_size=8"):
        create_model("hybrid-r50-vit-b/16", patch_size=8)


def test_a_hybrid_stem_keeps_the_resnets_depth_and_its_map_is_the_patch_grid():
    assert stem_stages((3, 4, 6, 3), 16) == [3, 4, 9]  # the ViT paper's R50 stem (Sec. 4.1)
    assert stem_stages((2, 2, 2, 2), 8) == [2, 6] and stem_stages((3, 4, 6, 3), 32) == [3, 4, 6, 3]
    for family in ("vit", "vit22b"):
        model = create_model(f"hybrid-r26-{family}-ti/8", img_size=32, num_classes=3, depth=1, embed_dim=32, num_heads=2)
        assert isinstance(model, HybridViT) and model.patch_embed.grid == 4 and model.pos_embed.shape[1] == 4**2 + 1
        assert model.config["block"] == ("serial" if family == "vit" else "parallel")
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert {"stem_layers", "stem_preact", "depth", "qk_norm"} <= set(model_options("hybrid-r26-vit-ti/8"))


def test_zero_init_last_starts_every_unit_as_its_shortcut():
    torch.manual_seed(0)
    resnet = create_model("bit-r26x1", img_size=32, num_classes=3, zero_init_last=True, **SMALL)
    hybrid = create_model("hybrid-r50-vit-ti/8", img_size=32, num_classes=3, depth=1, embed_dim=32, num_heads=2,
                          stem_width=16, stem_channels=[32, 64], stem_groups=4)  # fmt: skip
    units = [u for m in (resnet, hybrid) for u in m.modules() if isinstance(u, (Bottleneck, PreActBottleneck))]
    plain = [u for u in units if u.downsample is None]
    assert len(plain) == 1 + 2 + 12 and sum(isinstance(u, Bottleneck) for u in plain) == 14  # the hybrid's are post-act
    for unit in plain:
        x = torch.rand(2, unit.conv1.in_channels, 4, 4)  # non-negative, as a post-activation unit's input is
        assert torch.equal(unit(x), x)
    convs = [m for m in hybrid.patch_embed.backbone.modules() if isinstance(m, StdConv2d)]
    kaiming = [c.weight.std().item() / (2 / (c.out_channels * c.kernel_size[0] ** 2)) ** 0.5 for c in convs]
    assert 0.7 < min(kaiming) and max(kaiming) < 1.3  # Kaiming (fan out), not the ViT's trunc-normal(0.02)
    assert not create_model("bit-r26x1", num_classes=3, **SMALL).stages[0].blocks[0].conv3.weight.eq(0).all()  # off by default


def test_a_deep_post_activation_hybrid_stem_learns():
    """The R50 hybrid's 13-unit second stage under the ViT's init (trunc-normal 0.02, unit last norms) stayed at
    chance here (loss 2.31 after 200 steps); with the ResNet's own init and zero last norms it falls to ~1.6."""
    torch.manual_seed(0)
    data = make_builtin(512, 3)
    images, labels = data.images.float() / 127.5 - 1, data.labels
    model = create_model("hybrid-r50-vit-ti/8", img_size=32, num_classes=10, depth=2, embed_dim=64, num_heads=2,
                         mlp_dim=128, stem_width=16, stem_channels=[32, 64], stem_groups=4)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(200):
        batch = torch.randint(512, (32,))
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 2.0 < sum(losses[:20]) / 20


def test_same_padding_puts_the_odd_pixel_last_like_tensorflow():
    x = torch.ones(1, 1, 224, 224)
    padded = pad_same(x, 7, 2)  # TF: ceil(224 / 2) = 112 outputs need 5 more pixels, 2 before and 3 after
    rows = padded[0, 0, :, 100]
    assert padded.shape[-2:] == (229, 229) and rows[:2].sum() == 0 and rows[2:226].all() and rows[226:].sum() == 0
    conv = StdConv2d(1, 1, 3, 2)
    conv.pad_same()
    assert conv(torch.randn(1, 1, 15, 15)).shape[-2:] == (8, 8)


def test_measured_flops_of_a_vit_match_the_planners_formula():
    measured = forward_flops("vit-ti/16", 64, num_classes=10)
    assert measured == flops_per_step(preset_shape("vit-ti/16", 64, 10), batch=1) / 3
    assert forward_flops("bit-r50x1", 224, num_classes=1000) == 8_178_368_512  # 4.09 GMACs, timm's figure for R50x1


def test_checkpointed_units_give_the_same_gradients_and_bf16_autocast_runs():
    torch.manual_seed(0)
    model, images = create_model("bit-r26x1", img_size=32, num_classes=3, **SMALL), torch.randn(2, 3, 32, 32)
    model(images).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    model(images).square().sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)
    with torch.autocast("cpu", torch.bfloat16):
        assert model(images).dtype == torch.bfloat16
