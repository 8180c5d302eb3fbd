"""Numeric precision of a run: fp32, bf16 autocast, or `auto` — bf16 only where it is fast."""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext

import torch


@functools.cache
def bf16_is_fast(device_type: str) -> bool:
    """Whether bf16 matmuls beat fp32 on this device.

    On GPUs bf16 is native wherever torch says it is supported. CPUs differ: with AVX512-BF16 or
    AMX, bf16 doubled training speed, while on an AVX2-only EPYC a 512² bf16 matmul ran about
    70x slower than fp32 (see benchmarks/README.md), so a short probe decides.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
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


def resolve_precision(precision: str, device: torch.device) -> str:
    """`fp32` or `bf16`; `auto` picks bf16 where it is faster than fp32 on `device`."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_is_fast(device.type) else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast on `device`, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
