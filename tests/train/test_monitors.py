"""Stability monitors and stabilisers against direct computation on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab import create_model
from vitlab.models.blocks import watch_attention
from vitlab.train.classify import penalties
from vitlab.train.monitors import LossAboveStart, StabilityMonitor, attention_entropy, high_norm_fraction


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, eps=1e-8)  # moments without moving the weights
    optimizer.step()
    values = monitor.collect(logits, grad_norm, optimizer)

    assert values["max_logit"] == pytest.approx(logits.max().item())
    assert values["log_z"] == pytest.approx(torch.log(torch.exp(logits.double()).sum(-1)).mean().item(), rel=1e-5)
    # After Adam's first step v̂ = g², so each element contributes g²/max(g², ε²): 1 unless |g| < ε.
    grads = torch.cat([p.grad.flatten().double() for p in model.parameters()])
    ratios = grads**2 / torch.clamp(grads**2, min=1e-16)
    assert values["update_rms"] == pytest.approx(ratios.mean().sqrt().item(), rel=1e-5)
    tokens = {}
    model.norm.register_forward_pre_hook(lambda module, inputs: tokens.setdefault("x", inputs[0]))
    model(x)
    norms = tokens["x"].norm(dim=-1).flatten()
    assert values["high_norm_tokens"] == pytest.approx((norms > 4 * norms.median()).double().mean().item())
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
    values = monitor.collect(logits, torch.tensor(1.0), torch.optim.SGD(model.parameters(), lr=0.1))
    assert not any(k.startswith("attn") or k == "high_norm_tokens" for k in values)
    assert values["update_rms"] == 0  # SGD has no second moment


def test_adam_update_rms_after_two_steps_matches_the_bias_corrected_second_moment():
    w = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([w], betas=(0.9, 0.99), eps=1e-3)
    g1, g2 = torch.tensor([1.0, 2.0, 1e-4]), torch.tensor([3.0, -1.0, 2e-4])
    for g in (g1, g2):
        w.grad = g.clone()
        optimizer.step()
    v_hat = (0.99 * 0.01 * g1**2 + 0.01 * g2**2) / (1 - 0.99**2)
    expected = (g2**2 / v_hat.clamp(min=1e-6)).mean().sqrt()
    model = torch.nn.Module()
    model.w = w
    values = StabilityMonitor(model).collect(torch.zeros(1, 2), torch.tensor(1.0), optimizer)
    assert values["update_rms"] == pytest.approx(expected.item(), rel=1e-5)
    assert values["update_rms_max"] == pytest.approx(expected.item(), rel=1e-5)  # one tensor: the same


def test_high_norm_fraction_counts_tokens_far_above_the_median():
    tokens = torch.ones(2, 5, 4)  # norm 2 each
    tokens[0, 1] *= 10  # norm 20 > 4 × 2
    tokens[1, 3] *= 3  # norm 6 < 8: not an artifact
    assert high_norm_fraction(tokens).item() == pytest.approx(0.1)


def test_loss_above_start_counts_evaluations_in_a_row_and_resumes_from_its_state():
    watch = LossAboveStart(2, {"l0": 2.0})
    assert [watch.exceeded(v) for v in (3.0, 1.0, 3.0)] == [False, False, False]
    resumed = LossAboveStart(2, watch.state_dict())  # one evaluation above ℓ₀ is carried over
    assert resumed.exceeded(float("nan")) is True


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
