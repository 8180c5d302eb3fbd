"""Precision choice by device (GPU properties mocked), fp16 autocast and the loss scaler's overflow skip."""

import pytest
import torch

from vitlab.train import precision as prec
from vitlab.train.precision import autocast, choose_precision, make_grad_scaler, resolve_precision, scaler_backs_off

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend that a CUDA device of a given compute capability is present; bf16 'supported' everywhere."""

    def set_capability(major: int, minor: int, name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what emulating GPUs answer

    return set_capability


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp32")],
)
def test_auto_picks_bf16_only_on_gpus_that_compute_it_natively(gpu, capability, expected):
    gpu(*capability, name="Tesla T4")
    chosen, why = choose_precision("auto", CUDA)
    assert chosen == expected == resolve_precision("auto", CUDA)
    assert f"compute capability {capability[0]}.{capability[1]}" in why and "Tesla T4" in why


def test_a_set_precision_is_kept_with_its_reason(gpu):
    gpu(7, 5)
    assert choose_precision("bf16", CUDA) == ("bf16", "set by train.precision")
    assert choose_precision("fp32", torch.device("cpu")) == ("fp32", "set by train.precision")


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_a_cpu_follows_the_bf16_probe(monkeypatch, fast, expected):
    monkeypatch.setattr(prec, "cpu_bf16_is_fast", lambda: fast)
    chosen, why = choose_precision("auto", torch.device("cpu"))
    assert chosen == expected and "CPU" in why


def test_fp16_autocast_computes_in_half_precision():
    layer = torch.nn.Linear(8, 8)
    with autocast(torch.device("cpu"), "fp16"):
        assert layer(torch.randn(2, 8)).dtype == torch.float16
    with autocast(torch.device("cpu"), "fp32"):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_the_grad_scaler_is_on_for_fp16_only():
    cpu = torch.device("cpu")
    assert make_grad_scaler("fp16", cpu).is_enabled()
    assert not make_grad_scaler("bf16", cpu).is_enabled() and not make_grad_scaler("fp32", cpu).is_enabled()
    assert not scaler_backs_off(make_grad_scaler("fp32", cpu))


def fp16_step(model, optimizer, scaler, x, y) -> tuple[bool, float]:
    """The loop's recipe: scaled backward, unscale before clipping, step only when finite, update always."""
    with autocast(torch.device("cpu"), "fp16"):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    finite = bool(torch.isfinite(loss.detach() + grad_norm))
    if finite:
        scaler.step(optimizer)
    backs_off = not finite and scaler_backs_off(scaler)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return finite, backs_off


def test_an_fp16_overflow_skips_the_step_and_halves_the_scale_then_training_goes_on():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # far beyond fp16's range: the gradients overflow
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    finite, backs_off = fp16_step(model, optimizer, scaler, x, y)
    assert not finite and backs_off  # counted as skipped, but the scaler is only finding its range
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was skipped
    assert scaler.get_scale() == 2.0**39
    scaler.update(new_scale=2.0**10)
    finite, _ = fp16_step(model, optimizer, scaler, x, y)
    assert finite and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
