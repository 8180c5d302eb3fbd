"""The fused blocks against the same computation written out unfused, for every switch combination."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.models.blocks import Attention, DropPath, ParallelBlock, SerialBlock

DIM, HEADS, MLP, TOKENS = 24, 3, 40, 7


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (LayerNorm scales and biases too) random values, so nothing hides behind init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + scale)


def reference_layer_norm(x, weight=None, bias=None, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def norm_params(module):
    """(weight, bias) of a LayerNorm, or (None, None) for Identity / non-affine."""
    return getattr(module, "weight", None), getattr(module, "bias", None)


def reference_attention(q, k, v, q_norm, k_norm):
    """Heads split by hand, optional per-head LayerNorm, then softmax(q kᵀ/√d) v written out."""
    b, n, _ = q.shape
    d = DIM // HEADS
    outs = []
    for h in range(HEADS):
        qh, kh, vh = (t[:, :, h * d : (h + 1) * d] for t in (q, k, v))
        if q_norm is not None:
            qh = reference_layer_norm(qh, *q_norm)
            kh = reference_layer_norm(kh, *k_norm)
        scores = torch.einsum("bid,bjd->bij", qh, kh) / math.sqrt(d)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        outs.append(torch.einsum("bij,bjd->bid", weights, vh))
    return torch.cat(outs, dim=-1)


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_parallel(block: ParallelBlock, x: torch.Tensor, branch_norm: str, qk_norm: bool) -> torch.Tensor:
    """Unfused ViT-22B block: separate q, k, v, fc1 and attention-out / fc2 projections."""
    w_in = block.in_proj.weight
    wq, wk, wv, w1 = w_in[:DIM], w_in[DIM : 2 * DIM], w_in[2 * DIM : 3 * DIM], w_in[3 * DIM :]
    qkv_bias = block.qkv_bias if block.qkv_bias is not None else torch.zeros(3 * DIM)
    bq, bk, bv = qkv_bias[:DIM], qkv_bias[DIM : 2 * DIM], qkv_bias[2 * DIM :]
    wo, w2 = block.out_proj.weight[:, :DIM], block.out_proj.weight[:, DIM:]
    y = reference_layer_norm(x, *norm_params(block.norm))
    q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
    qk = (norm_params(block.q_norm), norm_params(block.k_norm)) if qk_norm else (None, None)
    attn = reference_attention(q, k, v, *qk) @ wo.T
    mlp = gelu(y @ w1.T + block.mlp_bias) @ w2.T
    if branch_norm == "none":
        return x + attn + mlp + block.out_proj.bias
    if branch_norm == "mlp":  # Eq. 2 of the paper
        return x + attn + block.out_proj.bias + reference_layer_norm(mlp, *norm_params(block.branch_norm))
    return x + reference_layer_norm(attn + mlp + block.out_proj.bias)  # the paper's code: LN on the sum


@pytest.mark.parametrize(
    "qk_norm,qkv_bias,norm_bias,branch_norm,impl",
    list(itertools.product([True, False], [True, False], [True, False], ["none", "mlp", "sum"], ["matmul", "sdpa"])),
)
def test_parallel_block_equals_unfused_reference(qk_norm, qkv_bias, norm_bias, branch_norm, impl):
    block = ParallelBlock(DIM, HEADS, MLP, qkv_bias, qk_norm, norm_bias, branch_norm, attn_impl=impl).eval()
    randomise(block)
    x = torch.randn(2, TOKENS, DIM, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(block(x), reference_parallel(block, x, branch_norm, qk_norm), atol=1e-5, rtol=1e-5)


def reference_serial(block: SerialBlock, x: torch.Tensor, qk_norm: bool) -> torch.Tensor:
    """Pre-LN block written out: x + proj(attn(LN1 x)), then + fc2(gelu(fc1(LN2 x)))."""
    a = block.attn
    y = reference_layer_norm(x, *norm_params(block.norm1))
    w, b = a.qkv.weight, a.qkv.bias if a.qkv.bias is not None else torch.zeros(3 * DIM)
    q, k, v = (y @ w[i * DIM : (i + 1) * DIM].T + b[i * DIM : (i + 1) * DIM] for i in range(3))
    qk = (norm_params(a.q_norm), norm_params(a.k_norm)) if qk_norm else (None, None)
    x = x + reference_attention(q, k, v, *qk) @ a.proj.weight.T + a.proj.bias
    y = reference_layer_norm(x, *norm_params(block.norm2))
    return x + gelu(y @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


@pytest.mark.parametrize(
    "qk_norm,qkv_bias,norm_bias,impl", list(itertools.product([True, False], [True, False], [True, False], ["matmul", "sdpa"]))
)
def test_serial_block_equals_explicit_reference(qk_norm, qkv_bias, norm_bias, impl):
    block = SerialBlock(DIM, HEADS, MLP, qkv_bias, qk_norm, norm_bias, attn_impl=impl).eval()
    randomise(block, seed=3)
    x = torch.randn(2, TOKENS, DIM, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(block(x), reference_serial(block, x, qk_norm), atol=1e-5, rtol=1e-5)


def test_attention_switches_change_parameters():
    assert Attention(DIM, HEADS, qkv_bias=False).qkv.bias is None
    assert isinstance(Attention(DIM, HEADS, qk_norm=True).q_norm, torch.nn.LayerNorm)
    assert ParallelBlock(DIM, HEADS, MLP, norm_bias=False).norm.bias is None
    eq2 = ParallelBlock(DIM, HEADS, MLP, branch_norm="mlp")
    plain = ParallelBlock(DIM, HEADS, MLP)
    extra = sum(p.numel() for p in eq2.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == DIM  # Eq. 2 adds only the branch LayerNorm's scale (no bias in the ViT-22B family)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(1000, 3, 4)
    y = drop(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample.std(dim=1) == 0).all()
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6
    assert torch.equal(drop.eval()(x), x)


def test_attention_dropout_only_in_training():
    block = ParallelBlock(DIM, HEADS, MLP, attn_dropout=0.5).eval()
    x = torch.randn(2, TOKENS, DIM)
    torch.testing.assert_close(block(x), block(x))
    block.train()
    assert not torch.allclose(block(x), block(x))


def test_sdpa_and_matmul_blocks_have_identical_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, TOKENS, DIM)
    grads = []
    for impl in ("matmul", "sdpa"):
        block = ParallelBlock(DIM, HEADS, MLP, attn_impl=impl)
        randomise(block)
        block(x).square().sum().backward()
        grads.append([p.grad for p in block.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gelu_reference_matches_torch():
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(gelu(x), F.gelu(x))


def test_watch_attention_reports_each_layers_logits_and_changes_nothing():
    from vitlab import create_model
    from vitlab.models.blocks import watch_attention

    for family in ("vit", "vit22b"):
        model = create_model(f"{family}-ti/8", img_size=16, num_classes=3, depth=2).eval()
        x = torch.randn(2, 3, 16, 16)
        seen = {}
        with watch_attention(model, lambda layer, logits: seen.setdefault(layer, logits)):
            watched = model(x)
        torch.testing.assert_close(watched, model(x))
        assert sorted(seen) == [0, 1] and seen[0].shape == (2, 3, 5, 5)
        # Layer 0's logits are q kᵀ/√d of its own (QK-normed) projections.
        block = model.blocks[0]
        tokens = block.norm1(model.embed(x)) if family == "vit" else block.norm(model.embed(x))
        weight = block.attn.qkv.weight if family == "vit" else block.in_proj.weight
        bias = block.attn.qkv.bias if family == "vit" else None
        qkv = F.linear(tokens, weight[: 2 * 192], None if bias is None else bias[: 2 * 192])
        q, k = qkv[..., :192].unflatten(-1, (3, 64)).transpose(1, 2), qkv[..., 192:].unflatten(-1, (3, 64)).transpose(1, 2)
        norms = (block.attn.q_norm, block.attn.k_norm) if family == "vit" else (block.q_norm, block.k_norm)
        expected = norms[0](q) @ norms[1](k).transpose(-2, -1) / 8.0
        torch.testing.assert_close(seen[0], expected, atol=1e-4, rtol=1e-4)
        assert all(m.attention_hook is None for m in model.modules() if hasattr(m, "attention_hook"))
