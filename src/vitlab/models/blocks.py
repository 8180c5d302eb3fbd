"""Transformer building blocks: attention, MLP, the serial ViT block and the ViT-22B parallel block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitlab.errors import check_choice

ATTENTION_IMPLS = ("auto", "matmul", "sdpa")
BRANCH_NORMS = ("none", "mlp", "sum")


def resolve_attention_impl(impl: str, device: torch.device) -> str:
    """Pick the attention kernel: explicit matmuls on CPU, fused SDPA elsewhere.

    Measured in benchmarks/README.md: on CPU the SDPA backward in bf16 is 1.3x slower than
    two batched matmuls and a softmax; on GPUs SDPA dispatches to flash/memory-efficient kernels.
    """
    if impl != "auto":
        return impl
    return "matmul" if device.type == "cpu" else "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over (B, H, N, d) tensors, by the chosen kernel."""
    impl = resolve_attention_impl(impl, q.device)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    weights = logits.softmax(dim=-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v


def layer_norm(dim: int, bias: bool = True, affine: bool = True) -> nn.LayerNorm:
    """LayerNorm with the ViT epsilon (1e-6, as in the reference ViT and timm)."""
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine, bias=bias and affine)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def qk_norms(head_dim: int, enabled: bool, bias: bool) -> tuple[nn.Module, nn.Module]:
    """LayerNorms over each head's features of queries and keys (ViT-22B), or identities."""
    if not enabled:
        return nn.Identity(), nn.Identity()
    return layer_norm(head_dim, bias), layer_norm(head_dim, bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (timm naming: qkv, proj)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str = "auto",
    ):
        super().__init__()
        self.q_norm, self.k_norm = qk_norms(dim // num_heads, qk_norm, norm_bias)
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = attend(self.q_norm(q), self.k_norm(k), v, self.attn_impl, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class Mlp(nn.Module):
    """Two-layer GELU MLP (timm naming: fc1, fc2)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SerialBlock(nn.Module):
    """Pre-LN ViT block: x = x + Attn(LN(x)); x = x + MLP(LN(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        attn_impl: str = "auto",
    ):
        super().__init__()
        self.norm1 = layer_norm(dim, norm_bias)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, norm_bias, attn_dropout, dropout, attn_impl)
        self.norm2 = layer_norm(dim, norm_bias)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ParallelBlock(nn.Module):
    """ViT-22B parallel block: y = x + MLP(LN(x)) + Attn(LN(x)), with fused projections.

    One matmul computes [q, k, v, mlp_hidden] (`in_proj`), one computes attention-out plus
    MLP-out (`out_proj`, whose single bias is the sum of both branches' biases), as in
    Dehghani et al. 2023, Sec. 2. `branch_norm` selects the stabiliser of "Deeper Inside Deep ViT":
      - "none": the ViT-22B block above;
      - "mlp":  the paper's Eq. 2, y = x + LN(MLP(y')) + Attn(y'), y' = LN(x). The MLP-out
                matmul then runs apart from attention-out; the shared out bias stays on the
                attention branch and the branch LayerNorm's own affine acts on the MLP branch, so
                turning the switch on adds only that LayerNorm's parameters;
      - "sum":  what the paper's code did: y = x + LN(MLP(y') + Attn(y')), LN without affine.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = False,
        qk_norm: bool = True,
        norm_bias: bool = False,
        branch_norm: str = "none",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        attn_impl: str = "auto",
    ):
        check_choice("branch_norm", branch_norm, BRANCH_NORMS)
        super().__init__()
        self.q_norm, self.k_norm = qk_norms(dim // num_heads, qk_norm, norm_bias)
        self.dim, self.mlp_dim, self.num_heads = dim, mlp_dim, num_heads
        self.branch_norm_kind = branch_norm
        self.attn_drop = attn_dropout
        self.attn_impl = attn_impl
        self.norm = layer_norm(dim, norm_bias)
        self.in_proj = nn.Linear(dim, 3 * dim + mlp_dim, bias=False)
        self.qkv_bias = nn.Parameter(torch.zeros(3 * dim)) if qkv_bias else None
        self.mlp_bias = nn.Parameter(torch.zeros(mlp_dim))
        self.act = nn.GELU()
        self.out_proj = nn.Linear(dim + mlp_dim, dim)
        if branch_norm == "mlp":
            self.branch_norm = layer_norm(dim, norm_bias)
        elif branch_norm == "sum":
            self.branch_norm = layer_norm(dim, affine=False)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def in_bias(self) -> torch.Tensor:
        """The fused input projection's bias: qkv part (zeros when disabled), then MLP part."""
        qkv_bias = self.qkv_bias if self.qkv_bias is not None else self.mlp_bias.new_zeros(3 * self.dim)
        return torch.cat([qkv_bias, self.mlp_bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = F.linear(self.norm(x), self.in_proj.weight, self.in_bias())
        qkv, hidden = fused.split([3 * self.dim, self.mlp_dim], dim=-1)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        attn = attend(self.q_norm(q), self.k_norm(k), v, self.attn_impl, self.attn_drop if self.training else 0.0)
        attn = rearrange(attn, "b h n d -> b n (h d)")
        hidden = self.drop(self.act(hidden))
        if self.branch_norm_kind == "mlp":
            w_attn, w_mlp = self.out_proj.weight.split([self.dim, self.mlp_dim], dim=-1)
            update = F.linear(attn, w_attn, self.out_proj.bias) + self.branch_norm(F.linear(hidden, w_mlp))
        else:
            update = self.out_proj(torch.cat([attn, hidden], dim=-1))
            if self.branch_norm_kind == "sum":
                update = self.branch_norm(update)
        return x + self.drop_path(self.drop(update))
