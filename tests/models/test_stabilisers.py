"""The stabiliser switches of the model: LayerScale (`layer_scale`) and register tokens (`num_registers`), in both
block families: what each changes, their timm names and round trip, the masked path, the planner, the refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitlab import VitlabError, count_parameters, create_model
from vitlab.inspection import attention_maps
from vitlab.models.blocks import ParallelBlock, SerialBlock, watch_attention
from vitlab.models.export import export_model
from vitlab.models.masked import MaskedAutoencoder, MaskedPatchPrediction
from vitlab.models.planner import flops_per_step, measured_saved_bytes, parameter_count, preset_shape, saved_activation_bytes
from vitlab.models.weights import load_timm_checkpoint

from .test_export import CLASSES, DATA, DIM, IMG, PATCH, images, randomised, timm_parallel_logits, tiny

FAMILIES = ["vit", "vit22b"]
TOKENS = (IMG // PATCH) ** 2 + 1  # patches and the class token


def same_weights(source: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    """`target` with every tensor it shares with `source`; its own (the stabiliser's) keep their init."""
    target.load_state_dict(source.state_dict(), strict=False)
    return target.eval()


@pytest.mark.parametrize("branch_norm", ["none", "mlp"])
def test_layer_scale_scales_both_branches_of_the_parallel_block_by_its_init_value(branch_norm):
    torch.manual_seed(0)
    off = ParallelBlock(DIM, 3, 96, qkv_bias=True, branch_norm=branch_norm).eval()
    on = same_weights(off, ParallelBlock(DIM, 3, 96, qkv_bias=True, branch_norm=branch_norm, layer_scale_init=0.25))
    x = torch.randn(2, 5, DIM)
    with torch.no_grad():
        torch.testing.assert_close(on(x) - x, 0.25 * (off(x) - x), atol=1e-6, rtol=1e-5)
        on.ls2.gamma.zero_()  # per branch: without the MLP's gain, only the attention branch (and its bias) is left
        attention = off.ls1(off.project_out(off.attend_heads(off.project_in(off.norm(x))[0]), torch.zeros(2, 5, 96)))
        torch.testing.assert_close(on(x) - x, 0.25 * attention, atol=1e-6, rtol=1e-5)
    assert [n for n, _ in on.named_parameters() if n.startswith("ls")] == ["ls1.gamma", "ls2.gamma"]


def test_layer_scale_scales_each_branch_of_the_serial_block_by_its_init_value():
    torch.manual_seed(0)
    off = SerialBlock(DIM, 3, 96).eval()
    on = same_weights(off, SerialBlock(DIM, 3, 96, layer_scale_init=1e-2))
    x = torch.randn(2, 5, DIM)
    with torch.no_grad():
        after_attention = x + 1e-2 * off.attn(off.norm1(x))
        expected = after_attention + 1e-2 * off.mlp(off.norm2(after_attention))
        torch.testing.assert_close(on(x), expected, atol=1e-6, rtol=1e-5)
        assert (on(x) - off(x)).abs().max() > 1e-2  # the gain does change the block
    assert torch.equal(on.ls1.gamma, torch.full((DIM,), 1e-2)) and on.ls2.gamma.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_scale_is_in_the_model_as_timms_ls_gammas_and_off_by_default(family):
    names = set(tiny(family, layer_scale=1e-5).state_dict()) - set(tiny(family).state_dict())
    assert names == {f"blocks.{i}.ls{j}.gamma" for i in range(2) for j in (1, 2)}
    assert set(tiny(family, layer_scale=0).state_dict()) == set(tiny(family).state_dict())  # 0 is off, as None


@pytest.mark.parametrize("family", FAMILIES)
def test_registers_lengthen_the_sequence_inside_only_and_change_the_output(family):
    torch.manual_seed(0)
    model = randomised(tiny(family, num_registers=3))
    assert model.state_dict()["reg_token"].shape == (1, 3, DIM)
    lengths = []
    with torch.no_grad(), watch_attention(model, lambda layer, logits: lengths.append(logits.shape[-1])):
        logits, features = model(images(2)), model.forward_features(images(2))
    assert lengths == [TOKENS + 3] * 4  # two blocks, two calls: every block sees the registers
    assert logits.shape == (2, CLASSES) and features.shape == (2, TOKENS, DIM)  # the registers are cut at the output
    with torch.no_grad():
        model.reg_token[:, 1] += torch.randn(DIM)  # not a constant, which the blocks' LayerNorms would remove
        assert (model(images(2)) - logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_registers_are_initialised_near_zero_and_trained_without_weight_decay(family):
    from vitlab.train.optim import parameter_groups

    model = tiny(family, num_registers=4)
    assert model.reg_token.abs().max() < 1e-4  # N(0, 1e-6), as DINOv2 and timm
    decayed = {id(p) for g in parameter_groups(model, 0.1) if g["weight_decay"] for p in g["params"]}
    assert id(model.reg_token) not in decayed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_timm_export_of_layer_scale_and_registers_reimports_with_the_same_logits(tmp_path, family, pool):
    options = dict(layer_scale=1e-5, num_registers=2, pool=pool)
    model = randomised(tiny(family, **options))
    export_model(model, "timm", tmp_path, DATA)
    args = json.loads((tmp_path / "create_model.json").read_text())
    sd = load_file(tmp_path / "model.safetensors")
    prefix = int(pool == "cls")
    assert args["reg_tokens"] == 2 and torch.equal(sd["reg_token"], model.reg_token)
    # timm's pos_embed covers [cls, registers, patches]: the registers' rows are zero, the others vitlab's
    assert sd["pos_embed"].shape[1] == model.pos_embed.shape[1] + 2
    assert not sd["pos_embed"][:, prefix : prefix + 2].any()
    if family == "vit":
        assert args["init_values"] == 1e-5 and torch.equal(sd["blocks.1.ls2.gamma"], model.blocks[1].ls2.gamma)
    else:  # timm's parallel block has one gain on the sum: the branch gains are in the out projections
        assert args["init_values"] is None and not any("ls" in k.split(".")[2] for k in sd if k.startswith("blocks."))
        with torch.no_grad():
            torch.testing.assert_close(timm_parallel_logits(sd, args, images()), model(images()), atol=1e-4, rtol=0)
    rebuilt = load_timm_checkpoint(tiny(family, **options), tmp_path / "model.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images()), model(images()), atol=1e-5, rtol=0)


def test_a_timm_parallel_checkpoint_with_a_layer_scale_on_the_sum_loads_with_its_logits(tmp_path):
    export_model(randomised(tiny("vit22b")), "timm", tmp_path, DATA)
    args = json.loads((tmp_path / "create_model.json").read_text())
    sd = load_file(tmp_path / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    for i in range(2):  # timm's ParallelScalingBlock built with init_values: ls.gamma on attention-out + MLP-out
        sd[f"blocks.{i}.ls.gamma"] = torch.rand(DIM, generator=gen) + 0.5
    save_file(sd, tmp_path / "model.safetensors")
    with torch.no_grad():
        expected = timm_parallel_logits(sd, args, images())
        for options in ({}, dict(layer_scale=1e-5)):
            model = load_timm_checkpoint(tiny("vit22b", **options), tmp_path / "model.safetensors").eval()
            torch.testing.assert_close(model(images()), expected, atol=1e-4, rtol=0)
    assert torch.equal(model.blocks[0].ls1.gamma, torch.ones(DIM))  # the gain went into the out projection


@pytest.mark.parametrize("option, named", [(dict(layer_scale=1e-5), "layer_scale"), (dict(num_registers=1), "num_registers")])
def test_hugging_face_export_refuses_the_stabilisers_it_cannot_express(tmp_path, option, named):
    with pytest.raises(VitlabError, match=f"{named}: transformers' ViT has no"):
        export_model(tiny(**option), "hf", tmp_path, DATA)


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(layer_scale=-1e-5), "layer_scale=-1e-05 must be a finite number >= 0"),
        (dict(layer_scale="big"), "layer_scale='big'"),
        (dict(num_registers=-1), "num_registers=-1 must be a whole number >= 0"),
        (dict(num_registers=1.5), "num_registers=1.5"),
        (dict(layer_scale=1e-5, branch_norm="sum"), "layer_scale with branch_norm='sum'"),
    ],
)
def test_bad_stabiliser_values_are_refused_in_one_line(options, named):
    with pytest.raises(VitlabError, match=named) as caught:
        tiny("vit22b", **options)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("method", ["mae", "mpp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_pretraining_runs_the_registers_through_the_encoder_and_learns_them(method, family):
    torch.manual_seed(0)
    encoder = create_model(
        f"{family}-ti/4",
        img_size=16,
        num_classes=0,
        depth=2,
        embed_dim=32,
        num_heads=2,
        mlp_dim=64,
        num_registers=2,
        layer_scale=0.1,
    )
    wrapper = (
        MaskedAutoencoder(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2)
        if method == "mae"
        else MaskedPatchPrediction(encoder, (0.5,) * 3, (0.5,) * 3)
    )
    seen = []
    encoder.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    loss = wrapper(torch.randn(3, 3, 16, 16))
    visible = 4 if method == "mae" else 16  # MAE: 75 % of the 16 patches removed; MPP corrupts them in place
    assert seen == [1 + visible + 2]
    loss.backward()
    assert torch.isfinite(loss) and encoder.reg_token.grad.abs().sum() > 0
    if method == "mae":
        assert encoder.blocks[0].ls1.gamma.grad.abs().sum() > 0 and wrapper.decoder_blocks[0].ls1.gamma.shape == (16,)


def test_attention_maps_hold_the_class_token_and_the_patches_only():
    model = randomised(tiny(num_registers=3))
    maps = attention_maps(model, images(2))
    assert maps.shape == (2, 2, 3, TOKENS, TOKENS)
    assert (maps.sum(-1) < 1 - 1e-6).all()  # what the registers took is cut, not spread over the others


@pytest.mark.parametrize("name", ["vit-ti/16", "vit22b-ti/16"])
def test_the_planner_counts_the_gains_and_the_register_tokens(name):
    options = dict(num_registers=3, layer_scale=1e-5)
    shape = preset_shape(name, 64, 10, **options)
    assert shape.tokens == 16 + 1 + 3
    assert parameter_count(shape) == count_parameters(name, img_size=64, num_classes=10, **options)
    assert flops_per_step(shape, 8) > flops_per_step(preset_shape(name, 64, 10), 8)
    model = create_model(name, img_size=64, num_classes=10, **options)
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        measured = measured_saved_bytes(model, torch.randn(2, 3, 64, 64))
        assert measured == saved_activation_bytes(shape, 2, checkpointing, "fp32")


def test_fine_tuning_at_another_size_reads_a_timm_export_with_registers(tmp_path):
    from vitlab.models.weights import fit_to_model, load_state_dict_strict
    from vitlab.train.finetune import pretrained_state_dict

    model = randomised(tiny(num_registers=2))
    export_model(model, "timm", tmp_path, DATA)
    larger = tiny(num_registers=2, img_size=48)  # a 6x6 grid: the 4x4 position embedding is resampled
    source = pretrained_state_dict(tmp_path / "model.safetensors", "timm", larger)
    load_state_dict_strict(larger, fit_to_model(source, larger, keep_head=True), "export")
    assert torch.equal(larger.reg_token, model.reg_token) and torch.equal(larger.pos_embed[:, 0], model.pos_embed[:, 0])
