"""Fixtures of the model tests: the device of the tests marked `gpu`."""

import os

import pytest
import torch


@pytest.fixture
def gpu() -> torch.device:
    """CUDA for the `gpu` tests; VITLAB_TEST_DEVICE=cpu runs them on the CPU (benchmarks/gpu_check.py --dry-run)."""
    device = torch.device(os.environ.get("VITLAB_TEST_DEVICE", "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return device
