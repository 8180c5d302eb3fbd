"""timm-format checkpoints load into the serial ViT and give the reference model's logits."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vitlab import VitlabError, create_model
from vitlab.models.weights import (
    load_google_vit_checkpoint,
    load_hf_checkpoint,
    load_timm_checkpoint,
    resample_pos_embed,
    to_hf,
)

DIM, HEADS, DEPTH, MLP, PATCH, IMG, CLASSES = 48, 3, 2, 96, 8, 32, 10


def timm_state_dict(seed: int = 0) -> dict:
    """Random tensors under timm's VisionTransformer names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.2  # noqa: E731
    tokens = (IMG // PATCH) ** 2 + 1
    sd = {
        "cls_token": r(1, 1, DIM),
        "pos_embed": r(1, tokens, DIM),
        "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": r(DIM),
        "norm.weight": 1 + r(DIM),
        "norm.bias": r(DIM),
        "head.weight": r(CLASSES, DIM),
        "head.bias": r(CLASSES),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + r(DIM),
            p + "norm1.bias": r(DIM),
            p + "attn.qkv.weight": r(3 * DIM, DIM),
            p + "attn.qkv.bias": r(3 * DIM),
            p + "attn.proj.weight": r(DIM, DIM),
            p + "attn.proj.bias": r(DIM),
            p + "norm2.weight": 1 + r(DIM),
            p + "norm2.bias": r(DIM),
            p + "mlp.fc1.weight": r(MLP, DIM),
            p + "mlp.fc1.bias": r(MLP),
            p + "mlp.fc2.weight": r(DIM, MLP),
            p + "mlp.fc2.bias": r(DIM),
        }
    return sd


def reference_vit_logits(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer forward, written functionally from its published architecture."""
    ln = lambda x, name: F.layer_norm(x, (DIM,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)  # noqa: E731
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], dim=1) + sd["pos_embed"]
    b, n, _ = x.shape
    for i in range(DEPTH):
        p = f"blocks.{i}."
        qkv = F.linear(ln(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS)).softmax(-1) @ v
        x = x + F.linear(attn.transpose(1, 2).reshape(b, n, DIM), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.linear(ln(x, "norm")[:, 0], sd["head.weight"], sd["head.bias"])


def tiny_vit(**overrides):
    options = dict(img_size=IMG, num_classes=CLASSES, embed_dim=DIM, num_heads=HEADS, depth=DEPTH, mlp_dim=MLP)
    return create_model(f"vit-ti/{PATCH}", **{**options, **overrides})


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_gives_reference_logits(tmp_path, suffix):
    sd = timm_state_dict()
    path = tmp_path / f"vit{suffix}"
    save_file(sd, path) if suffix == ".safetensors" else torch.save({"model": sd}, path)
    model = load_timm_checkpoint(tiny_vit(), path).eval()
    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    expected = reference_vit_logits(sd, images)
    assert (model(images) - expected).abs().max() < 1e-4
    assert expected.std() > 0.1  # the check is not trivially satisfied by near-zero logits


def test_mismatched_and_missing_tensors_are_listed(tmp_path):
    sd = timm_state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["reg_token"] = torch.zeros(1, 4, DIM)
    sd["head.weight"] = torch.zeros(1000, DIM)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(VitlabError) as info:
        load_timm_checkpoint(tiny_vit(), tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "blocks.1.mlp.fc2.bias" in message and "reg_token" in message and "head.weight" in message


def test_parallel_model_refuses_timm_weights(tmp_path):
    save_file(timm_state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(VitlabError, match="serial"):
        load_timm_checkpoint(tiny_vit(block="parallel"), tmp_path / "vit.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": argparse.Namespace(payload="not a tensor")}, tmp_path / "evil.pth")
    with pytest.raises(VitlabError, match="weights-only"):
        load_timm_checkpoint(tiny_vit(), tmp_path / "evil.pth")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(VitlabError, match="does not exist"):
        load_timm_checkpoint(tiny_vit(), tmp_path / "nope.safetensors")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(VitlabError, match=".safetensors"):
        load_timm_checkpoint(tiny_vit(), tmp_path / "w.ckpt")


def google_params(seed: int = 1) -> dict:
    """Random ViT parameters in Flax's shapes (kernels in × out, attention kernels split by head)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.2  # noqa: E731
    d = DIM // HEADS
    block = lambda: {  # noqa: E731
        "ln1": (1 + r(DIM), r(DIM)),
        "ln2": (1 + r(DIM), r(DIM)),
        **{n: (r(DIM, HEADS, d), r(HEADS, d)) for n in ("query", "key", "value")},
        "out": (r(HEADS, d, DIM), r(DIM)),
        "fc1": (r(DIM, MLP), r(MLP)),
        "fc2": (r(MLP, DIM), r(DIM)),
    }
    return {
        "embedding": (r(PATCH, PATCH, 3, DIM), r(DIM)),
        "cls": r(1, 1, DIM),
        "pos_cls": r(1, 1, DIM),
        "pos": r(1, (IMG // PATCH) ** 2, DIM),
        "blocks": [block() for _ in range(DEPTH)],
        "encoder_norm": (1 + r(DIM), r(DIM)),
        "head": (r(DIM, CLASSES), r(CLASSES)),
    }


def google_npz(params: dict, layout: str) -> dict:
    """`params` under Google's names: the original ViT release (`vit`: saved by its trainer under opt/target/ beside
    optimizer state), big_vision (`big_vision`: under params/, no position for the class token) and big_vision's
    scanned encoder (`scan`: one encoderblock with a leading layer axis)."""
    a = {
        "embedding/kernel": params["embedding"][0],
        "embedding/bias": params["embedding"][1],
        "cls": params["cls"],
        "Transformer/encoder_norm/scale": params["encoder_norm"][0],
        "Transformer/encoder_norm/bias": params["encoder_norm"][1],
        "head/kernel": params["head"][0],
        "head/bias": params["head"][1],
    }
    if layout == "vit":
        a["Transformer/posembed_input/pos_embedding"] = torch.cat([params["pos_cls"], params["pos"]], dim=1)
        ln1, attn, ln2, mlp = "LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"
    else:
        a["pos_embedding"] = params["pos"]
        ln1, attn, ln2, mlp = "LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"
    blocks = []
    for b in params["blocks"]:
        names = {}
        for ln, norm in ((ln1, b["ln1"]), (ln2, b["ln2"])):
            names |= {f"{ln}/scale": norm[0], f"{ln}/bias": norm[1]}
        for n in ("query", "key", "value", "out"):
            names |= {f"{attn}/{n}/kernel": b[n][0], f"{attn}/{n}/bias": b[n][1]}
        for n, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            names |= {f"{mlp}/{dense}/kernel": b[n][0], f"{mlp}/{dense}/bias": b[n][1]}
        blocks.append(names)
    if layout == "scan":
        a |= {f"Transformer/encoderblock/{k}": torch.stack([b[k] for b in blocks]) for k in blocks[0]}
    else:
        a |= {f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}
    a = {k: v.numpy() for k, v in a.items()}
    if layout == "vit":
        return {**{f"opt/target/{k}": v for k, v in a.items()}, "opt/state/step": np.zeros(())}
    return {f"params/{k}": v for k, v in a.items()}


def reference_google_logits(params: dict, images: torch.Tensor, class_token_position: bool) -> torch.Tensor:
    """The Flax ViT forward on Flax-shaped parameters (NHWC kernel, per-head einsums)."""
    ln = lambda x, p: F.layer_norm(x, (DIM,), p[0], p[1], eps=1e-6)  # noqa: E731
    x = F.conv2d(images, params["embedding"][0].permute(3, 2, 0, 1), params["embedding"][1], stride=PATCH)
    x = x.flatten(2).transpose(1, 2) + params["pos"]
    cls = params["cls"] + (params["pos_cls"] if class_token_position else 0)
    x = torch.cat([cls.expand(len(x), -1, -1), x], dim=1)
    for b in params["blocks"]:
        y = ln(x, b["ln1"])
        q, k, v = (torch.einsum("bnd,dhe->bhne", y, b[n][0]) + b[n][1][:, None] for n in ("query", "key", "value"))
        heads = (q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS)).softmax(-1) @ v
        x = x + torch.einsum("bhne,hed->bnd", heads, b["out"][0]) + b["out"][1]
        y = F.gelu(ln(x, b["ln2"]) @ b["fc1"][0] + b["fc1"][1])
        x = x + y @ b["fc2"][0] + b["fc2"][1]
    return ln(x, params["encoder_norm"])[:, 0] @ params["head"][0] + params["head"][1]


@pytest.mark.parametrize("layout", ["vit", "big_vision", "scan"])
def test_google_npz_gives_the_flax_models_logits(tmp_path, layout):
    params = google_params()
    np.savez(tmp_path / "vit.npz", **google_npz(params, layout))
    model = load_google_vit_checkpoint(tiny_vit(), tmp_path / "vit.npz").eval()
    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    expected = reference_google_logits(params, images, class_token_position=layout == "vit")
    assert (model(images) - expected).abs().max() < 1e-4
    assert expected.std() > 0.1


def test_google_npz_with_other_heads_or_a_map_head_is_refused(tmp_path):
    np.savez(tmp_path / "vit.npz", **google_npz(google_params(), "big_vision"))
    with pytest.raises(VitlabError, match="3 heads, the model 4"):
        load_google_vit_checkpoint(tiny_vit(num_heads=4), tmp_path / "vit.npz")
    arrays = google_npz(google_params(), "big_vision") | {"params/MAPHead_0/probe": np.zeros((1, 1, DIM), np.float32)}
    np.savez(tmp_path / "map.npz", **arrays)
    with pytest.raises(VitlabError, match="MAPHead_0/probe"):
        load_google_vit_checkpoint(tiny_vit(), tmp_path / "map.npz")


def test_resampled_position_embedding_keeps_the_prefix_and_interpolates_the_grid():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 16, 8, generator=gen)
    out = resample_pos_embed(pos, (6, 6), num_prefix_tokens=1)
    assert out.shape == (1, 1 + 36, 8) and torch.equal(out[:, 0], pos[:, 0])
    grid = pos[0, 1:].T.reshape(1, 8, 4, 4)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).reshape(8, 36).T
    torch.testing.assert_close(out[0, 1:], expected)
    constant = resample_pos_embed(torch.ones(1, 9, 4), (5, 5), num_prefix_tokens=0)
    torch.testing.assert_close(constant, torch.ones(1, 25, 4))
    assert resample_pos_embed(pos, (4, 4), 1) is pos
    with pytest.raises(VitlabError, match="not a square grid"):
        resample_pos_embed(pos, (6, 6), num_prefix_tokens=0)


def hf_folder(folder, sd: dict):
    """timm-named tensors `sd` as a Hugging Face ViT folder (config.json and model.safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "num_attention_heads": HEADS}))
    save_file({k: v.contiguous().clone() for k, v in to_hf(sd).items()}, folder / "model.safetensors")
    return folder


def spoiled(name: str, value) -> dict:
    """timm_state_dict() with one entry of `name` set to `value` (a float) or cast to `value` (a dtype)."""
    sd = timm_state_dict()
    sd[name] = sd[name].to(value) if isinstance(value, torch.dtype) else sd[name].index_fill(0, torch.tensor([0]), value)
    return sd


def test_non_finite_or_non_float_weights_are_refused_with_the_tensor_named(tmp_path):
    save_file(spoiled("blocks.1.mlp.fc2.weight", float("nan")), tmp_path / "nan.safetensors")
    torch.save({"model": spoiled("pos_embed", float("-inf"))}, tmp_path / "inf.pth")
    save_file(spoiled("norm.weight", torch.int64), tmp_path / "int.safetensors")
    hf_folder(tmp_path / "hf", spoiled("blocks.0.mlp.fc1.bias", float("inf")))
    params = google_params()
    params["cls"][0, 0, 0] = float("nan")
    np.savez(tmp_path / "nan.npz", **google_npz(params, "big_vision"))
    loads = [
        (lambda: load_timm_checkpoint(tiny_vit(), tmp_path / "nan.safetensors"), r"blocks\.1\.mlp\.fc2\.weight hold NaN or inf"),
        (lambda: load_timm_checkpoint(tiny_vit(), tmp_path / "inf.pth"), r"pos_embed hold NaN or infinite"),
        (
            lambda: load_timm_checkpoint(tiny_vit(), tmp_path / "int.safetensors"),
            r"norm\.weight \(torch\.int64\) are not floating",
        ),
        (lambda: load_hf_checkpoint(tiny_vit(), tmp_path / "hf"), r"vit\.encoder\.layer\.0\.intermediate\.dense\.bias hold NaN"),
        (lambda: load_google_vit_checkpoint(tiny_vit(), tmp_path / "nan.npz"), r"params/cls hold NaN"),
    ]
    for load, named in loads:
        with pytest.raises(VitlabError, match=named):
            load()


def _garbage(folder):
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")


def _truncated(folder):
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])


def _link_out(folder):
    (folder / "model.safetensors").rename(folder.parent / "elsewhere.safetensors")
    (folder / "model.safetensors").symlink_to(folder.parent / "elsewhere.safetensors")


def _dangling(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(folder.parent / "missing.safetensors")


def _query_shape(folder):
    sd = load_file(folder / "model.safetensors")
    sd["vit.encoder.layer.1.attention.attention.query.weight"] = torch.zeros(DIM, DIM - 8)
    save_file(sd, folder / "model.safetensors")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_garbage, r"model\.safetensors is damaged .*download or export it again"),
        (_truncated, r"model\.safetensors is damaged"),
        (_dangling, r"model\.safetensors is a broken link"),
        (_query_shape, r"vit\.encoder\.layer\.1\.attention\.attention\.\{query,key,value\}\.weight have unequal shapes"),
        (
            lambda folder: (folder / "config.json").write_bytes(b'{"model_type": "vit\xff"}'),
            r"cannot read .*config\.json as JSON",
        ),
        (lambda folder: (folder / "config.json").write_text("[1, 2]"), r"config\.json holds a JSON list"),
    ],
)
def test_a_damaged_hugging_face_folder_is_one_error_naming_the_file(tmp_path, damage, message):
    folder = hf_folder(tmp_path / "hf", timm_state_dict())
    damage(folder)
    with pytest.raises(VitlabError, match=message) as info:
        load_hf_checkpoint(tiny_vit(), folder)
    assert "\n" not in str(info.value)


def test_a_link_leading_out_of_the_folder_is_refused_but_the_hub_caches_links_into_its_blobs_are_followed(tmp_path):
    """A snapshot folder of the Hub's cache links each file to ../../blobs/HASH: that is no link leading out."""
    _link_out(hf_folder(tmp_path / "plain", timm_state_dict()))
    with pytest.raises(
        VitlabError, match=r"model\.safetensors is a link to .*elsewhere\.safetensors, outside .*; copy the file in"
    ):
        load_hf_checkpoint(tiny_vit(), tmp_path / "plain")
    cache = tmp_path / "models--google--vit" / "snapshots" / "abc123"
    hf_folder(cache, timm_state_dict())
    (tmp_path / "models--google--vit" / "blobs").mkdir()
    for name in ("config.json", "model.safetensors"):
        (cache / name).rename(tmp_path / "models--google--vit" / "blobs" / name.upper())
        (cache / name).symlink_to(Path("..") / ".." / "blobs" / name.upper())
    model = load_hf_checkpoint(tiny_vit(), cache)
    assert torch.equal(model.pos_embed, timm_state_dict()["pos_embed"])
