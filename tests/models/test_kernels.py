"""The kernels' policies: attention kernels that agree, bf16 products on CPUs without bf16 GEMMs, one compiled graph."""

import itertools

import pytest
import torch

from tests.models.test_blocks import DIM, HEADS, MLP, TOKENS, randomise
from vitlab.models import kernels
from vitlab.models.blocks import ParallelBlock
from vitlab.models.kernels import attend
from vitlab.models.vit import VisionTransformer


def test_attention_kernels_agree_in_bf16():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, TOKENS, 8, generator=gen).bfloat16() for _ in range(3))
    torch.testing.assert_close(attend(q, k, v, "matmul"), attend(q, k, v, "sdpa"), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("block,bf16", list(itertools.product(["serial", "parallel"], [False, True])))
def test_models_compile_to_one_graph(block, bf16):
    """`train.compile` traces each model whole: a graph break per projection (once, a CPU probe in `gemm`) fails here."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=16,
        patch_size=8,
        embed_dim=DIM,
        depth=2,
        num_heads=HEADS,
        mlp_dim=MLP,
        num_classes=5,
        block=block,
        qk_norm=block == "parallel",
    )
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(3, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.testing.assert_close(compiled(x), model(x))


def test_bf16_products_on_a_cpu_without_bf16_gemms_match_the_native_ones(monkeypatch):
    """Where the CPU lacks bf16 GEMMs, `gemm` multiplies the bf16-rounded operands in fp32; it must give the bf16 answer."""
    block = ParallelBlock(DIM, HEADS, MLP, qkv_bias=True)
    randomise(block, seed=5)
    x = torch.randn(2, TOKENS, DIM, generator=torch.Generator().manual_seed(6))
    outputs = []
    for native in (True, False):
        monkeypatch.setattr(kernels, "NATIVE_CPU_BF16_GEMM", native)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(block(x))
    assert all(out.dtype == torch.float32 for out in outputs)  # the residual stream stays fp32 under autocast
    torch.testing.assert_close(outputs[1], outputs[0], atol=0.05, rtol=0.02)
    assert not torch.allclose(outputs[0], block(x), atol=1e-3)  # bf16 rounding is really there, on both paths
