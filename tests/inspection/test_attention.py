"""Attention maps of both block families, the query's row, and attention rollout against direct computation."""

import pytest
import torch
import torch.nn.functional as F

from vitlab import VitlabError, create_model
from vitlab.inspection import attention_maps, attention_rollout, default_query, query_attention


def tiny(family: str, pool: str = "cls"):
    options = dict(img_size=24, num_classes=3, depth=2, embed_dim=32, num_heads=2, mlp_dim=64, pool=pool)
    return create_model(f"{family}-ti/8", **options)


@pytest.mark.parametrize("family,pool", [("vit", "cls"), ("vit22b", "gap")])
def test_attention_maps_are_each_layers_softmax_and_leave_the_model_as_it_was(family, pool):
    torch.manual_seed(0)
    model = tiny(family, pool).train()
    images = torch.randn(2, 3, 24, 24)
    maps = attention_maps(model, images)
    tokens = 9 + (pool == "cls")
    assert maps.shape == (2, 2, 2, tokens, tokens)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 2, tokens))
    assert model.training
    # Layer 0 by hand: softmax(q kᵀ / √d) of the first block's (QK-normed) projections.
    block = model.blocks[0]
    x = model.embed(images)
    if family == "vit":
        qkv = block.attn.qkv(block.norm1(x))
        q_norm, k_norm = block.attn.q_norm, block.attn.k_norm
    else:
        qkv = F.linear(block.norm(x), block.in_proj.weight[: 3 * 32])
        q_norm, k_norm = block.q_norm, block.k_norm
    q, k, _ = qkv.unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
    expected = (q_norm(q) @ k_norm(k).transpose(-2, -1) / 4.0).softmax(-1)
    torch.testing.assert_close(maps[0], expected, atol=1e-5, rtol=1e-4)


def test_query_selects_the_class_token_row_the_mean_row_or_a_patch_row():
    matrix = torch.arange(5 * 5, dtype=torch.float32).reshape(5, 5)  # 1 class token + 2×2 patches
    assert query_attention(matrix, 1, "cls").tolist() == [[1, 2], [3, 4]]
    assert query_attention(matrix, 1, 2).tolist() == [[16, 17], [18, 19]]  # patch 2 is token 3
    assert query_attention(matrix, 1, "mean").tolist() == [[11, 12], [13, 14]]
    with pytest.raises(VitlabError, match="no class token"):
        query_attention(matrix[1:, 1:], 0, "cls")
    with pytest.raises(VitlabError, match="patch index in"):
        query_attention(matrix, 1, 4)
    assert default_query(tiny("vit", "cls")) == "cls" and default_query(tiny("vit", "gap")) == "mean"


def test_rollout_without_residual_is_the_product_of_head_averaged_layers():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 1, 3, 5, 5, generator=gen).softmax(-1)  # 2 layers, 1 image, 3 heads, 5 tokens
    heads = maps.mean(2)[:, 0]
    expected = (heads[1] @ heads[0])[0, 1:].reshape(2, 2)
    torch.testing.assert_close(attention_rollout(maps, 1, "cls", residual=0.0)[0], expected)


def test_rollout_with_full_residual_keeps_each_token_to_itself():
    maps = torch.rand(3, 2, 2, 5, 5).softmax(-1)
    rollout = attention_rollout(maps, 1, 0, residual=1.0)  # patch 0 draws on itself only
    assert rollout.shape == (2, 2, 2)
    torch.testing.assert_close(rollout[:, 0, 0], torch.ones(2))
    assert rollout.sum() == pytest.approx(2.0)
