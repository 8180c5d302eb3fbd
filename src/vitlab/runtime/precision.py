"""Numeric precision of a run: fp32, bf16 or fp16 autocast, or `auto` — a low precision only where it is fast."""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Compute capabilities: 8.0 (Ampere) is the first with bf16 tensor cores; 7.0 (Volta) the first with fp16
# ones (NVIDIA CUDA C++ Programming Guide, "Compute Capabilities"). Below 8.0, torch.cuda.is_bf16_supported()
# still answers True (bf16 is emulated through fp32), e.g. on the V100 (7.0) and T4 (7.5); below 7.0 fp16
# arithmetic is no faster than fp32 on most cards (the GTX 10xx series, 6.1, runs it at 1/64 of the rate).
NATIVE_BF16_CAPABILITY = (8, 0)
TENSOR_CORE_CAPABILITY = (7, 0)


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU, by a short probe.

    With AVX512-BF16 or AMX, bf16 doubled training speed, while on an AVX2-only EPYC a 512² bf16 matmul
    ran about 70x slower than fp32 (see benchmarks/README.md).
    """
    a = torch.randn(512, 512)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            x @ x
        timings[dtype] = time.perf_counter() - start
    return timings[torch.bfloat16] < timings[torch.float32]


def _cuda_choice(device: torch.device) -> tuple[str, str]:
    """bf16, fp16 or fp32 for a CUDA device by its compute capability, with the reason."""
    capability = torch.cuda.get_device_capability(device)
    name = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})"
    if capability >= NATIVE_BF16_CAPABILITY:
        return "bf16", f"{name} computes bf16 natively"
    if capability >= TENSOR_CORE_CAPABILITY:
        return "fp16", f"{name} has fp16 but no bf16 tensor cores; fp16 with loss scaling"
    return "fp32", f"{name} has no tensor cores, so neither bf16 nor fp16 is faster than fp32"


def choose_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision to compute in (`fp32`, `bf16` or `fp16`) and why it was chosen, for the run to print."""
    if precision != "auto":
        return precision, "set by train.precision"
    if device.type == "cuda":
        return _cuda_choice(device)
    if cpu_bf16_is_fast():
        return "bf16", "bf16 matmuls are faster than fp32 on this CPU (AVX512-BF16 or AMX)"
    return "fp32", "bf16 matmuls are slower than fp32 on this CPU (no AVX512-BF16 or AMX)"


def autocast(device: torch.device, precision: str):
    """bf16 or fp16 autocast on `device`, or nothing for fp32."""
    if precision in DTYPES:
        return torch.autocast(device.type, dtype=DTYPES[precision])
    return nullcontext()


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A dynamic loss scaler for fp16 (gradients below fp16's range would flush to zero); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def scaler_backs_off(scaler: torch.amp.GradScaler) -> bool:
    """Whether a non-finite fp16 gradient is the scaler finding its range (scale still >= 1), not divergence.

    The scale starts at 2^16 and halves at every overflow; only once it is below 1 do the gradients overflow
    fp16 unscaled. Ask before `scaler.update()`.
    """
    return scaler.is_enabled() and scaler.get_scale() >= 1.0
