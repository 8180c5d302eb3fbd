"""On the GPU: the same logits as on the CPU, SDPA and matmul attention agreeing, mixed precision near fp32."""

import copy

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.models.kernels import attend

pytestmark = pytest.mark.gpu
SMALL = dict(img_size=16, patch_size=8, embed_dim=64, depth=1, num_heads=2, mlp_dim=128, num_classes=10)


def small_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model(name, **SMALL)


@pytest.mark.parametrize("name", ["vit-s/16", "vit22b-s/16"])
def test_model_on_the_device_gives_the_cpu_logits(gpu, name):
    model = small_model(name).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():  # TF32 is off for matmuls by default, so CUDA computes in fp32 too
        expected = model(x)
        got = model.to(gpu)(x.to(gpu)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sdpa_and_matmul_attention_agree_with_their_gradients(gpu, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, device=gpu, dtype=dtype, requires_grad=True) for _ in range(3))
    outs, grads = [], []
    for impl in ("sdpa", "matmul"):
        out = attend(q, k, v, impl)
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
        outs.append(out.float())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("name", ["vit-s/16", "vit22b-s/16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_mixed_precision_training_step_stays_near_fp32(gpu, name, dtype):
    x = torch.randn(8, 3, 16, 16, device=gpu)
    y = torch.arange(8, device=gpu) % 10
    losses, params = [], []
    for autocast in (False, True):
        model = copy.deepcopy(small_model(name)).to(gpu)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler(gpu.type, enabled=autocast and dtype == torch.float16)
        with torch.autocast(gpu.type, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=5e-3)
