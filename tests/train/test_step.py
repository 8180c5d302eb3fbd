"""The one optimizer step of every loop: fp16 overflow skips, non-finite skips, clipping by value and by norm, the scaler state."""

import math

import torch

from vitlab.runtime.precision import autocast
from vitlab.train.step import OptimizerStep

CPU = torch.device("cpu")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def one_step(stepper: OptimizerStep, model, optimizer, x, y, precision: str = "fp16"):
    with autocast(CPU, precision):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    stepper.backward(loss)
    result = stepper.step(optimizer, model.parameters(), loss)
    stepper.update()
    optimizer.zero_grad(set_to_none=True)
    return result


def test_an_fp16_overflow_skips_the_step_and_halves_the_scale_then_training_goes_on():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = OptimizerStep("fp16", CPU, clip_grad_norm=1.0)
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # far beyond fp16's range: the gradients overflow
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    result = one_step(stepper, model, optimizer, x, y)
    assert not result.finite and result.overflow  # skipped, but the scaler is only finding its range
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert stepper.scaler.get_scale() == 2.0**39
    stepper.scaler.update(new_scale=2.0**10)
    result = one_step(stepper, model, optimizer, x, y)
    assert result.finite and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_non_finite_loss_in_fp32_is_skipped_and_is_no_overflow():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = OptimizerStep("fp32", CPU)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 16)
    x[0, 0] = math.nan
    result = one_step(stepper, model, optimizer, x, torch.randint(0, 4, (8,)), "fp32")
    assert not result.finite and not result.overflow
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_clipping_by_value_then_by_norm_and_the_reported_norm_is_the_unclipped_one():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = torch.randn(8, 16) * 100, torch.randint(0, 4, (8,))
    stepper = OptimizerStep("fp32", CPU, clip_grad_norm=1e-3, clip_grad_value=1e-4)
    before = [p.detach().clone() for p in model.parameters()]
    with autocast(CPU, "fp32"):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    stepper.backward(loss)
    result = stepper.step(optimizer, model.parameters(), loss)
    grads = [p.grad for p in model.parameters()]
    assert max(g.abs().max().item() for g in grads) <= 1e-4 + 1e-12  # clipped by value
    assert torch.nn.utils.get_total_norm(grads).item() <= 1e-3 * (1 + 1e-5)  # then by norm
    assert result.finite and result.grad_norm.item() <= math.sqrt(sum(g.numel() for g in grads)) * 1e-4 * (1 + 1e-5)
    moved = torch.nn.utils.get_total_norm([a - b for a, b in zip(model.parameters(), before)]).item()
    assert moved <= 1e-3 * (1 + 1e-4)  # SGD at lr 1 moved by the clipped gradient


def test_the_scaler_state_round_trips_through_checkpoint_metadata():
    stepper = OptimizerStep("fp16", CPU)
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    restored = OptimizerStep("fp16", CPU)
    restored.load_state_dict(stepper.state_dict())
    assert restored.scaler.get_scale() == 1024.0
    assert OptimizerStep("fp32", CPU).state_dict() == {}
