"""Precision choice by device (GPU properties mocked), fp16 autocast and the loss scaler's settings."""

import pytest
import torch

from vitlab.runtime import precision as prec
from vitlab.runtime.precision import autocast, choose_precision, make_grad_scaler, scaler_backs_off

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
    assert chosen == expected
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
