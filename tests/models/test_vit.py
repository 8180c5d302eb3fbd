"""The assembled ViT: presets, parameter counts, shapes, gradients, switches and errors."""

import time

import pytest
import torch

from vitlab import VitlabError, count_parameters, create_model
from vitlab.models import SIZES
from vitlab.models.vit import sincos_2d_position_embedding

# timm / big_vision reference counts: serial ViT, 1000 classes, class token, learned pos-embed, 224 px.
REFERENCE_COUNTS = {
    "vit-ti/16": 5_717_416,
    "vit-s/16": 22_050_664,
    "vit-b/16": 86_567_656,
    "vit-l/16": 304_326_632,
    "vit-h/14": 632_045_800,
}


@pytest.mark.parametrize("name,count", REFERENCE_COUNTS.items())
def test_parameter_counts_equal_reference(name, count):
    assert count_parameters(name) == count


def test_vit22b_counted_on_meta_within_0p2_percent_in_seconds():
    start = time.perf_counter()
    count = count_parameters("vit22b-22b/14")
    assert time.perf_counter() - start < 10
    assert abs(count / 21.743e9 - 1) < 0.002  # Dehghani et al. 2023, Table 1


def test_22b_forward_shapes_on_meta():
    with torch.device("meta"):
        model = create_model("vit22b-22b/14", num_classes=1000)
        logits = model(torch.empty(2, 3, 224, 224))
    assert logits.shape == (2, 1000)


@pytest.mark.parametrize("family", ["vit", "vit22b"])
@pytest.mark.parametrize("size", list(SIZES))
def test_every_preset_builds_small_with_right_shapes(family, size):
    # Every size at depth 1 and 16 px; sizes above S are built and run on the meta device.
    device = "cpu" if size in ("Ti", "S") else "meta"
    with torch.device(device):
        model = create_model(f"{family}-{size}/8", img_size=16, num_classes=5, depth=1)
        logits = model(torch.randn(2, 3, 16, 16))
    assert model.embed_dim == SIZES[size].width and model.blocks[0].drop_path.p == 0
    assert logits.shape == (2, 5)


COMMON_OPTIONS = [dict(), dict(pool="gap", pos_embed="sincos"), dict(head="mlp", dropout=0.1, drop_path=0.1)]
PARALLEL_OPTIONS = [dict(branch_norm="mlp"), dict(branch_norm="sum"), dict(qk_norm=False, qkv_bias=True, norm_bias=True)]


@pytest.mark.parametrize(
    "family,options",
    [("vit", o) for o in COMMON_OPTIONS] + [("vit22b", o) for o in COMMON_OPTIONS + PARALLEL_OPTIONS],
)
def test_gradients_reach_every_parameter(family, options):
    torch.manual_seed(0)
    model = create_model(f"{family}-ti/4", img_size=16, num_classes=3, depth=2, **options)
    model(torch.randn(4, 3, 16, 16)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_vit22b_family_switches():
    block = create_model("vit22b-s/16", depth=1).blocks[0]
    assert block.qkv_bias is None and block.norm.bias is None
    assert isinstance(block.q_norm, torch.nn.LayerNorm) and block.q_norm.bias is None
    serial = create_model("vit-s/16", depth=1).blocks[0]
    assert serial.attn.qkv.bias is not None and isinstance(serial.attn.q_norm, torch.nn.Identity)


def test_zero_head_gives_zero_logits():
    model = create_model("vit-ti/8", img_size=16, num_classes=4, zero_head=True)
    assert torch.equal(model(torch.randn(2, 3, 16, 16)), torch.zeros(2, 4))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_reset_head_gives_a_fresh_head_for_other_classes_and_keeps_the_rest(head):
    model = create_model("vit-ti/8", img_size=16, num_classes=10, depth=1, head=head)
    kept = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    torch.manual_seed(3)
    model.reset_head(7)
    torch.manual_seed(3)  # a fresh model's head init (trunc-normal 0.02, zero bias), and no other draw before it
    assert torch.equal(model.head.weight, torch.nn.init.trunc_normal_(torch.empty(7, 192), std=0.02))
    assert not model.head.bias.any() and model.head.weight.requires_grad
    after = model.state_dict()
    assert set(after) == set(kept) | {"head.weight", "head.bias"} and all(torch.equal(after[k], v) for k, v in kept.items())
    assert model.num_classes == 7 and model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    type(model)(**model.config).load_state_dict(after)  # the config describes the new head


def test_reset_head_honours_zero_head_and_can_remove_the_head():
    model = create_model("vit-ti/8", img_size=16, num_classes=4, depth=1, zero_head=True)
    model.reset_head(5)
    assert torch.equal(model(torch.randn(2, 3, 16, 16)), torch.zeros(2, 5))
    plain = create_model("vit-ti/8", img_size=16, num_classes=4, depth=1)
    plain.reset_head(3, zero=True)
    assert not plain.head.weight.any()
    plain.reset_head(0)
    assert plain(torch.randn(2, 3, 16, 16)).shape == (2, 192) and "head.weight" not in plain.state_dict()
    with pytest.raises(VitlabError, match="num_classes=-1 is negative"):
        plain.reset_head(-1)


def test_sincos_embedding_is_fixed_and_not_saved():
    model = create_model("vit-ti/8", img_size=32, num_classes=4, pos_embed="sincos", pool="gap")
    assert "pos_embed" not in model.state_dict()
    table = sincos_2d_position_embedding(4, 4, 192)
    torch.testing.assert_close(model.pos_embed[0], table)
    quarter = 192 // 4
    torch.testing.assert_close(table[:, :quarter] ** 2 + table[:, quarter : 2 * quarter] ** 2, torch.ones(16, quarter))
    # Patches in the same row share the y part; the x part differs along the row.
    assert torch.equal(table[0, 2 * quarter :], table[3, 2 * quarter :])
    assert not torch.equal(table[0, :quarter], table[3, :quarter])


def test_class_token_and_gap_pooling_differ_in_prefix_tokens():
    cls = create_model("vit-ti/8", img_size=32, num_classes=4)
    gap = create_model("vit-ti/8", img_size=32, num_classes=4, pool="gap")
    assert cls.pos_embed.shape[1] == 17 and gap.pos_embed.shape[1] == 16 and gap.cls_token is None


def test_fc_norm_normalises_the_pooled_tokens_instead_of_every_token():
    model = create_model("vit22b-ti/8", img_size=32, num_classes=4, pool="gap", fc_norm=True, depth=2).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    pooled = torch.nn.functional.layer_norm(tokens.mean(1), (192,), model.fc_norm.weight, eps=1e-6)
    torch.testing.assert_close(model(x), model.head(pooled))
    assert "fc_norm.weight" in model.state_dict() and not any(k.startswith("norm.") for k in model.state_dict())
    with pytest.raises(VitlabError, match="pool='gap'"):
        create_model("vit-ti/8", img_size=32, num_classes=4, fc_norm=True)


def test_model_config_rebuilds_the_same_architecture():
    model = create_model("vit22b-ti/4", img_size=32, num_classes=7, branch_norm="mlp")
    rebuilt = type(model)(**model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda: create_model("vit-s/16", img_size=30), ["30", "16"]),
        (lambda: create_model("vit-s/16", num_heads=5), ["384", "num_heads=5"]),
        (lambda: create_model("vit-q/16"), ["'q'", "Ti", "22B"]),
        (lambda: create_model("resnet-s/16"), ["resnet", "vit22b"]),
        (lambda: create_model("vit-s"), ["FAMILY-SIZE/PATCH"]),
        (lambda: create_model("vit22b-s/16", branch_norm="post"), ["branch_norm", "'mlp'"]),
        (lambda: create_model("vit-s/16", pool="max"), ["pool", "'gap'"]),
        (lambda: create_model("vit-s/16", block="moe"), ["block", "'parallel'"]),
        (lambda: create_model("vit-s/16", attn_impl="flash"), ["attn_impl", "'sdpa'"]),
        (lambda: create_model("vit-s/16", widht=3), ["widht", "embed_dim"]),
        (lambda: create_model("vit-s/16", branch_norm="mlp"), ["block='parallel'"]),
        (lambda: create_model("vit-s/16", drop_path=1.5), ["drop_path"]),
    ],
)
def test_bad_input_names_the_value_and_the_allowed_ones(call, words):
    with pytest.raises(VitlabError) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_wrong_input_resolution_is_reported():
    model = create_model("vit-ti/8", img_size=16, num_classes=2)
    with pytest.raises(VitlabError, match="img_size=32"):
        model(torch.randn(1, 3, 32, 32))


def test_size_names_are_case_insensitive_except_g_and_G():
    assert create_model("vit-TI/16", depth=1).embed_dim == 192
    assert count_parameters("vit-g/14", depth=1) != count_parameters("vit-G/14", depth=1)


@pytest.mark.parametrize("family", ["vit", "vit22b"])
def test_grad_checkpointing_gives_the_same_gradients_and_keeps_only_block_inputs(family):
    def step(checkpointing):
        torch.manual_seed(0)
        model = create_model(
            f"{family}-ti/8", img_size=16, num_classes=3, depth=3, drop_path=0.2, grad_checkpointing=checkpointing
        )
        torch.manual_seed(1)  # stochastic depth draws the same masks in the recomputation
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))).square().mean()
        loss.backward()
        return [p.grad for p in model.parameters()], sum(saved)

    grads, plain = step(False)
    checkpointed_grads, checkpointed = step(True)
    assert all(torch.equal(a, b) for a, b in zip(grads, checkpointed_grads))
    assert checkpointed < plain / 2


def test_a_model_built_on_meta_is_complete_after_to_empty_and_reset_parameters():
    torch.manual_seed(0)
    normal = create_model("vit22b-ti/8", img_size=16, num_classes=3, depth=2, pos_embed="sincos")
    with torch.device("meta"):
        model = create_model("vit22b-ti/8", img_size=16, num_classes=3, depth=2, pos_embed="sincos")
    model.to_empty(device="cpu")
    model.reset_parameters()
    torch.testing.assert_close(model.pos_embed, normal.pos_embed)  # the fixed table is filled by reset_parameters
