"""Transformer building blocks: attention, MLP, the serial ViT block and the ViT-22B parallel block."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitlab.errors import VitlabError, check_choice
from vitlab.models.kernels import ATTENTION_IMPLS, Linear, attend, attention_logits, gemm

BRANCH_NORMS = ("none", "mlp", "sum")
BLOCKS = ("serial", "parallel")


@contextmanager
def watch_attention(model: nn.Module, callback: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """While active, call `callback(layer, logits)` with every attention layer's pre-softmax logits.

    For inspection (attention maps, rollout, distances) and stability monitors (attention-logit
    growth, entropy collapse). Outside the context the blocks skip it entirely; inside, each layer
    pays one extra q kᵀ product (SDPA never exposes its logits).
    """
    layers = [m for m in model.modules() if isinstance(m, AttentionCore)]
    for index, layer in enumerate(layers):
        layer.attention_hook = functools.partial(callback, index)
    try:
        yield
    finally:
        for layer in layers:
            layer.attention_hook = None


def split_heads(qkv: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """(B, N, 3·H·d) → q, k, v as (B, H, N, d) views.

    Unbinding the q/k/v axis where it lies (after N) lets the backward stack the three gradients straight
    into the (B, N, 3·H·d) layout; unbinding a leading axis (einops' `three b h n d`) cost a stack and a copy.
    """
    qkv = rearrange(qkv, "b n (three h d) -> b n three h d", three=3, h=heads)
    return [rearrange(t, "b n h d -> b h n d") for t in qkv.unbind(2)]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) → (B, N, H·d); a view for SDPA's output on CPU, which is stored as (B, N, H, d)."""
    return rearrange(x, "b h n d -> b n (h d)")


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


class LayerScale(nn.Module):
    """A learnable per-channel gain on a residual branch, `init` at the start (CaiT, Touvron et al. 2021; timm's `gamma`)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"init={self.init}"


def layer_scale(dim: int, init: float | None) -> nn.Module:
    """A LayerScale starting at `init`, or an identity when `init` is None or 0 (off)."""
    return LayerScale(dim, init) if init else nn.Identity()


def qk_norms(head_dim: int, enabled: bool, bias: bool) -> tuple[nn.Module, nn.Module]:
    """LayerNorms over each head's features of queries and keys (ViT-22B), or identities."""
    if not enabled:
        return nn.Identity(), nn.Identity()
    return layer_norm(head_dim, bias), layer_norm(head_dim, bias)


class AttentionCore(nn.Module):
    """What every attention layer does between its projections: per-head QK norm, the watch hook, the kernel, dropout.

    Attention and ParallelBlock derive from it, so that its norms stay their own parameters (`q_norm.weight`).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, norm_bias: bool, attn_drop: float, attn_impl: str):
        super().__init__()
        self.q_norm, self.k_norm = qk_norms(dim // num_heads, qk_norm, norm_bias)
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.attn_impl = attn_impl
        self.attention_hook: Callable[[torch.Tensor], None] | None = None  # set by `watch_attention`

    def attend_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """Projected (B, N, 3·H·d) queries, keys and values → the heads' attention output (B, N, H·d)."""
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.attention_hook is not None:
            self.attention_hook(attention_logits(q, k))
        return merge_heads(attend(q, k, v, self.attn_impl, self.attn_drop if self.training else 0.0))


class Attention(AttentionCore):
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
        super().__init__(dim, num_heads, qk_norm, norm_bias, attn_drop, attn_impl)
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend_heads(self.qkv(x))))


class Mlp(nn.Module):
    """Two-layer GELU MLP (timm naming: fc1, fc2)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SerialBlock(nn.Module):
    """Pre-LN ViT block: x = x + Attn(LN(x)); x = x + MLP(LN(x)), each branch times its LayerScale gain if on."""

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
        layer_scale_init: float | None = None,
    ):
        super().__init__()
        self.norm1 = layer_norm(dim, norm_bias)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, norm_bias, attn_dropout, dropout, attn_impl)
        self.ls1 = layer_scale(dim, layer_scale_init)
        self.norm2 = layer_norm(dim, norm_bias)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.ls2 = layer_scale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class ParallelBlock(AttentionCore):
    """ViT-22B parallel block: y = x + MLP(LN(x)) + Attn(LN(x)), with fused projections.

    One matmul computes [q, k, v, mlp_hidden] (`in_proj`), one computes attention-out plus
    MLP-out (`out_proj`, whose single bias is the sum of both branches' biases), as in
    Dehghani et al. 2023, Sec. 2. `branch_norm` selects the stabiliser of "Deeper Inside Deep ViT":
      - "none": the ViT-22B block above;
      - "mlp":  the paper's Eq. 2, y = x + LN(MLP(y')) + Attn(y'), y' = LN(x). The MLP-out
                matmul then runs apart from attention-out; the shared out bias stays on the
                attention branch and the branch LayerNorm's own affine acts on the MLP branch, so
                turning the switch on adds only that LayerNorm's parameters;
      - "sum":  vitlab's variant, y = x + LN(MLP(y') + Attn(y')) with a non-affine LN on the sum; it keeps
                the input LayerNorm y' = LN(x), which the paper's code dropped (its block is
                `vitlab.models.ai602.SumNormParallelBlock`, the `ai602-vit22b-…` presets).
    With `layer_scale_init`, each branch has its own LayerScale gain (`ls1` attention, `ls2` MLP, as in the
    serial block), applied after the branch's out projection (and its LayerNorm, with "mlp").
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
        layer_scale_init: float | None = None,
    ):
        check_choice("branch_norm", branch_norm, BRANCH_NORMS)
        super().__init__(dim, num_heads, qk_norm, norm_bias, attn_dropout, attn_impl)
        self.dim, self.mlp_dim = dim, mlp_dim
        self.branch_norm_kind = branch_norm
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
        self.ls1, self.ls2 = layer_scale(dim, layer_scale_init), layer_scale(dim, layer_scale_init)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, mlp_in = self.project_in(self.norm(x))
        update = self.project_out(self.attend_heads(qkv), self.drop(self.act(mlp_in)))
        return x + self.drop_path(self.drop(update))

    def project_in(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`in_proj` of the normed tokens, as ([q, k, v] + qkv bias, MLP input + MLP bias).

        The fused weight as two GEMMs (same maths), so that the backward needs no concatenation of the
        (B, N, 3D + M) gradient. Measured on CPU: with `project_out`, a ViT-22B-S/4 block trained 15 %
        faster than with the single fused GEMMs.
        """
        w_qkv, w_mlp = self.in_proj.weight.split([3 * self.dim, self.mlp_dim])
        return gemm(F.linear, y, w_qkv, self.qkv_bias), gemm(F.linear, y, w_mlp, self.mlp_bias)

    def project_out(self, attn: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """`out_proj` of [attention output, MLP hidden] with its bias, and `branch_norm` where it acts.

        The MLP part accumulates into the attention part (addmm) instead of concatenating [attn, hidden], except
        with LayerScale, whose per-branch gains need each branch apart.
        """
        w_attn, w_mlp = self.out_proj.weight.split([self.dim, self.mlp_dim], dim=-1)
        attn = self.ls1(gemm(F.linear, attn, w_attn, self.out_proj.bias))
        if self.branch_norm_kind == "mlp":
            return attn + self.ls2(self.branch_norm(gemm(F.linear, hidden, w_mlp)))
        if isinstance(self.ls2, LayerScale):  # BlockSpec refuses it with branch_norm="sum"
            return attn + self.ls2(gemm(F.linear, hidden, w_mlp))
        update = gemm(torch.addmm, attn.flatten(0, 1), hidden.flatten(0, 1), w_mlp.t()).view_as(attn)
        return self.branch_norm(update) if self.branch_norm_kind == "sum" else update


def check_layer_scale(value: object) -> None:
    """Refuse a LayerScale init that is not a number >= 0 (None or 0: off)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf):
        raise VitlabError(
            f"layer_scale={value!r} must be a finite number >= 0; set the gains' initial value, e.g. 1e-5 (CaiT), or null/0 for none"
        )


@dataclass(frozen=True)
class BlockSpec:
    """The transformer-block keywords shared by every model built of these blocks, checked once."""

    block: str
    dim: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool
    qk_norm: bool
    norm_bias: bool
    branch_norm: str
    dropout: float
    attn_dropout: float
    drop_path: float
    attn_impl: str
    layer_scale: float | None = None

    def __post_init__(self) -> None:
        check_choice("block", self.block, BLOCKS)
        check_choice("branch_norm", self.branch_norm, BRANCH_NORMS)
        check_choice("attn_impl", self.attn_impl, ATTENTION_IMPLS)
        if self.dim % self.num_heads:
            raise VitlabError(
                f"embed_dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                f"choose num_heads among the divisors of {self.dim}"
            )
        if self.block == "serial" and self.branch_norm != "none":
            raise VitlabError(f"branch_norm={self.branch_norm!r} needs block='parallel' (it normalises the parallel branch)")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise VitlabError(f"{name}={getattr(self, name)} must be in [0, 1)")
        check_layer_scale(self.layer_scale)
        if self.layer_scale and self.branch_norm == "sum":
            raise VitlabError(
                "layer_scale with branch_norm='sum': the sum's LayerNorm would undo the branches' gains; "
                "use branch_norm 'none' or 'mlp' with layer_scale, or layer_scale null"
            )

    def build(self, count: int) -> list[nn.Module]:
        """`count` blocks, stochastic depth growing linearly from 0 to `drop_path` (Huang et al. 2016; DeiT)."""
        common = dict(
            dim=self.dim,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            norm_bias=self.norm_bias,
            dropout=self.dropout,
            attn_dropout=self.attn_dropout,
            attn_impl=self.attn_impl,
            layer_scale_init=self.layer_scale,
        )
        if self.block == "parallel":
            return [ParallelBlock(branch_norm=self.branch_norm, drop_path=rate, **common) for rate in self.rates(count)]
        return [SerialBlock(drop_path=rate, **common) for rate in self.rates(count)]

    def rates(self, count: int) -> list[float]:
        """The stochastic-depth rate of each of `count` blocks."""
        return [self.drop_path * i / max(count - 1, 1) for i in range(count)]
