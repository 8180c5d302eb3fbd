"""How the blocks' products run: the CPU GEMM policy for bf16 and the choice of attention kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLS = ("auto", "matmul", "sdpa")


def _native_cpu_bf16_gemm() -> bool:
    """Whether torch multiplies bf16 matrices natively on this CPU (oneDNN with AVX512 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Probed once at import: torch.compile cannot trace the probe (it returns a bool), and calling it in every
# `gemm` broke the compiled graph at every projection.
NATIVE_CPU_BF16_GEMM = _native_cpu_bf16_gemm()


def bf16_gemm_on_fp32(x: torch.Tensor) -> bool:
    """Whether a product with `x` would run in bf16 (autocast or bf16 tensors) on a CPU without bf16 GEMMs."""
    if x.device.type != "cpu" or NATIVE_CPU_BF16_GEMM:
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


def gemm(fn, *args: torch.Tensor | None) -> torch.Tensor:
    """`fn(*args)` for a matrix product (F.linear, torch.matmul, torch.addmm) in the caller's precision.

    Where the CPU has no bf16 GEMM (no AVX512/AMX), torch's bf16 fallback ran >100x slower than fp32 (benchmarks/README.md).
    Products of bf16 numbers are exact in fp32, so the fp32 GEMM of the bf16-rounded operands, rounded to
    bf16, is the bf16 GEMM with fp32 accumulation (as oneDNN's), only summed in another order.
    """
    if not bf16_gemm_on_fp32(args[0]):
        return fn(*args)
    with torch.autocast("cpu", enabled=False):
        return fn(*(a if a is None else a.bfloat16().float() for a in args)).bfloat16()


class Linear(nn.Linear):
    """nn.Linear computed by `gemm`, so that a bf16 product uses the fastest GEMM of the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm(F.linear, x, self.weight, self.bias)


def resolve_attention_impl(impl: str, q: torch.Tensor) -> str:
    """The kernel for q's device and dtype: SDPA, but `gemm` matmuls on CPU other than fp32 (why: benchmarks/README.md)."""
    if impl != "auto":
        return impl
    return "matmul" if q.device.type == "cpu" and q.dtype != torch.float32 else "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over (B, H, N, d) tensors, by the chosen kernel."""
    if resolve_attention_impl(impl, q) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    logits = gemm(torch.matmul, q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    weights = logits.softmax(dim=-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    return gemm(torch.matmul, weights, v)


def attention_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Pre-softmax attention logits q kᵀ / √d as a detached fp32 tensor (B, H, N, N)."""
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        return (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)
