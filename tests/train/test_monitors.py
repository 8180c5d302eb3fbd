"""Stability monitors and stabilisers against direct computation on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab import create_model
from vitlab.models.blocks import watch_attention
from vitlab.train.classify import penalties
from vitlab.train.monitors import StabilityMonitor, attention_entropy


def test_attention_entropy_of_uniform_and_one_hot_rows():
    uniform = torch.zeros(1, 2, 5, 7)
    assert attention_entropy(uniform).item() == pytest.approx(math.log(7))
    one_hot = torch.full((1, 1, 3, 4), -1e4)
    one_hot[..., 0] = 0
    assert attention_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["vit", "vit22b"])
def test_monitored_values_equal_direct_computation(family):
    torch.manual_seed(0)
    model = create_model(f"{family}-ti/8", img_size=16, num_classes=4, depth=2)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    monitor = StabilityMonitor(model)
    with monitor.watch(True):
        logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    values = monitor.collect(logits, grad_norm)

    assert values["max_logit"] == pytest.approx(logits.max().item())
    assert values["max_abs_grad"] == pytest.approx(max(p.grad.abs().max().item() for p in model.parameters()))
    direct_norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()
    assert values["grad_norm"] == pytest.approx(direct_norm, rel=1e-5)
    recorded = {}
    with watch_attention(model, lambda layer, a: recorded.setdefault(layer, a)):
        model(x)
    for layer in (0, 1):
        p = recorded[layer].softmax(-1)
        assert values[f"attn_logit_max/{layer}"] == pytest.approx(recorded[layer].max().item(), rel=1e-5)
        assert values[f"attn_entropy/{layer}"] == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)
    assert "max logit" in monitor.summary()


def test_unwatched_steps_record_no_attention():
    model = create_model("vit22b-ti/8", img_size=16, num_classes=4, depth=1)
    monitor = StabilityMonitor(model)
    with monitor.watch(False):
        logits = model(torch.randn(2, 3, 16, 16))
    logits.sum().backward()
    assert not any(k.startswith("attn") for k in monitor.collect(logits, torch.tensor(1.0)))


def test_z_loss_and_gradient_penalty_match_hand_computation():
    torch.manual_seed(0)
    model = create_model("vit22b-ti/8", img_size=16, num_classes=4, depth=1, attn_impl="matmul")
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits = model(x)
    loss = F.cross_entropy(logits, torch.tensor([1, 3]))
    terms = penalties(loss, logits, x, z_loss=1e-2, grad_penalty=0.5)
    assert terms["z_loss"].item() == pytest.approx(1e-2 * (torch.logsumexp(logits, -1) ** 2).mean().item())
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert terms["grad_penalty"].item() == pytest.approx(0.5 * (g**2).sum(dim=(1, 2, 3)).mean().item(), rel=1e-5)
    (loss + terms["grad_penalty"]).backward()  # differentiable twice
    assert all(p.grad is not None for p in model.parameters())
    assert penalties(loss, logits, x, 0.0, 0.0) == {}
