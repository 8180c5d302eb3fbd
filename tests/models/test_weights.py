"""timm-format checkpoints load into the serial ViT and give the reference model's logits."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitlab import VitlabError, create_model
from vitlab.models.weights import load_timm_checkpoint

DIM, HEADS, DEPTH, MLP, PATCH, IMG, CLASSES = 48, 3, 2, 96, 8, 32, 10


def timm_state_dict(seed: int = 0) -> dict:
    """Random tensors under timm's VisionTransformer names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.2  # noqa: E731
    tokens = (IMG // PATCH) ** 2 + 1
    sd = {
        "cls_token": r(1, 1, DIM), "pos_embed": r(1, tokens, DIM),
        "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": r(DIM),
        "norm.weight": 1 + r(DIM), "norm.bias": r(DIM), "head.weight": r(CLASSES, DIM), "head.bias": r(CLASSES),
    }  # fmt: skip
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + r(DIM), p + "norm1.bias": r(DIM),
            p + "attn.qkv.weight": r(3 * DIM, DIM), p + "attn.qkv.bias": r(3 * DIM),
            p + "attn.proj.weight": r(DIM, DIM), p + "attn.proj.bias": r(DIM),
            p + "norm2.weight": 1 + r(DIM), p + "norm2.bias": r(DIM),
            p + "mlp.fc1.weight": r(MLP, DIM), p + "mlp.fc1.bias": r(MLP),
            p + "mlp.fc2.weight": r(DIM, MLP), p + "mlp.fc2.bias": r(DIM),
        }  # fmt: skip
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
