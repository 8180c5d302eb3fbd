"""On paper: what training a preset needs per device under DDP and FSDP, and the FLOPs of a step.

Pure arithmetic on the preset's shape: nothing is built or allocated. The counts follow what vitlab's
blocks hold, and tests check them against meta-device parameter counts and against the bytes that
autograd saves (`measured_saved_bytes`). Bytes are those of AdamW training with fp32 master weights:

- parameters 4 B, gradients 4 B, AdamW's two moments 8 B per parameter (Rajbhandari et al. 2020, ZeRO,
  Sec. 3.1: "16Ψ" for mixed-precision Adam, there with fp16 copies inside);
- DDP keeps a full replica, and its gradient buckets a second copy of the gradients (PyTorch's default
  `gradient_as_bucket_view=False`); with bf16 autocast the bf16 weight copies are kept for the backward;
- FSDP shards parameters, gradients and moments over the N devices (ZeRO-3), and holds unsharded the
  parameters and gradients of the block being computed and of the prefetched next one, plus the
  embedding and head (FSDP2's root unit is not resharded after the forward), in the compute dtype;
- activations: the tensors each block saves for its backward (itemised in `block_activations`, after
  Korthikanti et al. 2022, "Reducing activation recomputation in large transformer models"), for the
  local batch; with checkpointing only each block's input is kept, and one block is recomputed at a time.
  The backward frees what it has used as it allocates gradients, so the saved activations are the peak
  (measured on CPU: within 1 % without and 7 % with checkpointing, benchmarks/README.md).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from vitlab.errors import VitlabError, check_choice
from vitlab.models.blocks import check_layer_scale
from vitlab.models.presets import FAMILIES, SIZES, preset_config
from vitlab.models.vit import VisionTransformer, check_num_registers

GIB = 2**30
PRECISIONS = ("bf16", "fp32")
ATTENTIONS = ("sdpa", "matmul")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs of a model: sizes, token count and the block's switches."""

    depth: int
    width: int
    mlp_dim: int
    heads: int
    patch: int
    image_size: int
    num_classes: int
    block: str
    qkv_bias: bool
    qk_norm: bool
    norm_bias: bool
    channels: int = 3
    registers: int = 0  # register tokens (Darcet et al. 2023), which every block sees
    layer_scale: bool = False  # a LayerScale gain on each of a block's two branches

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + 1 + self.registers  # the class token (presets pool with it) and the registers


def preset_shape(name: str, image_size: int = 224, num_classes: int = 1000, **options) -> Shape:
    """The shape of a preset (`vit22b-22b/14`, …) at an image size, with `options` (num_registers, layer_scale) over it."""
    defaults = {k: p.default for k, p in inspect.signature(VisionTransformer).parameters.items()}
    cfg = {**defaults, **preset_config(name), **options}
    check_num_registers(cfg["num_registers"])
    check_layer_scale(cfg["layer_scale"])
    if cfg["patch_size"] < 1 or image_size < cfg["patch_size"] or image_size % cfg["patch_size"]:
        raise VitlabError(f"image size {image_size} is not a positive multiple of {name}'s patch size {cfg['patch_size']}")
    return Shape(
        depth=cfg["depth"],
        width=cfg["embed_dim"],
        mlp_dim=cfg["mlp_dim"],
        heads=cfg["num_heads"],
        patch=cfg["patch_size"],
        image_size=image_size,
        num_classes=num_classes,
        block=cfg["block"],
        qkv_bias=cfg["qkv_bias"],
        qk_norm=cfg["qk_norm"],
        norm_bias=cfg["norm_bias"],
        registers=cfg["num_registers"],
        layer_scale=bool(cfg["layer_scale"]),
    )


def block_parameters(s: Shape) -> int:
    """Parameters of one block (vitlab.models.blocks)."""
    d, m = s.width, s.mlp_dim
    norm = d * (1 + s.norm_bias)
    qk_norms = 2 * (d // s.heads) * (1 + s.norm_bias) if s.qk_norm else 0
    qkv_bias = 3 * d if s.qkv_bias else 0
    gains = 2 * d if s.layer_scale else 0  # ls1, ls2
    if s.block == "serial":  # norm1, qkv, proj, norm2, fc1, fc2
        return norm + 3 * d * d + qkv_bias + qk_norms + d * d + d + norm + d * m + m + m * d + d + gains
    # norm, in_proj [q k v | mlp-in] without bias, the MLP-in bias, out_proj [attn-out | mlp-out] with one bias
    return norm + qk_norms + d * (3 * d + m) + qkv_bias + m + (d + m) * d + d + gains


def other_parameters(s: Shape) -> int:
    """Parameters outside the blocks: patch embedding, class token, position embedding, registers, final norm, head."""
    d = s.width
    patch_embedding = s.channels * s.patch**2 * d + d
    head = d * s.num_classes + s.num_classes if s.num_classes else 0
    positions = (s.patches + 1) * d
    return patch_embedding + d + positions + s.registers * d + d * (1 + s.norm_bias) + head


def parameter_count(s: Shape) -> int:
    """All parameters of the model."""
    return s.depth * block_parameters(s) + other_parameters(s)


def block_activations(s: Shape, attention: str = "sdpa") -> tuple[int, int]:
    """Elements one block saves for its backward per token: (kept in fp32, in the compute dtype).

    fp32 under autocast: LayerNorm inputs (the residual stream) and statistics, softmax statistics. LayerScale
    keeps each branch's output before its gain (2 d).
    """
    d, m, h = s.width, s.mlp_dim, s.heads
    gains = 2 * d if s.layer_scale else 0
    # SDPA keeps q, k, v, its output and a log-sum-exp per head; explicit matmuls keep q·scale, k, v, the
    # probabilities (a T-long row per head) and the merged output: 4 d either way, plus h or h·T.
    attn_fp32, attn_low = (h, 0) if attention == "sdpa" else (0, h * s.tokens)
    if s.block == "serial":
        # fp32: x, x + attention (LayerNorm inputs), 2 + 2 statistics;
        # low: norm1 out, q k v (3), attention out, norm2 out, fc1 out, GELU out.
        return 2 * d + 4 + attn_fp32, 6 * d + 2 * m + attn_low + gains
    # fp32: x, 2 statistics and 2 per head for each of the q and k LayerNorms;
    # low: LN(x), q k v (3), normalised q and k (2), attention out and its merged copy (2), MLP hidden, GELU out.
    return d + 2 + 4 * h + attn_fp32, 8 * d + 2 * m + attn_low + gains


def other_activations(s: Shape) -> tuple[int, int]:
    """Elements saved outside the blocks per image: (fp32, compute dtype).

    The patch pixels into the patch projection; the final LayerNorm's input and statistics, and its
    output, which the head reads through the class-token view. The registers are cut before that LayerNorm by a
    view, so its input still holds them.
    """
    kept = s.tokens - s.registers
    return s.tokens * s.width + 2 * kept, s.patches * s.channels * s.patch**2 + kept * s.width


def measured_saved_bytes(model: nn.Module, images: torch.Tensor) -> int:
    """What the arithmetic predicts, measured: bytes of the distinct storages (not parameters) that autograd
    saves during a forward of `model` on `images`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    return sum(storages.values())


@dataclass(frozen=True)
class Memory:
    """Bytes per device of one way to train."""

    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def block_activation_bytes(s: Shape, precision: str = "bf16", attention: str = "sdpa") -> float:
    """Bytes one block saves for its backward per image."""
    fp32, low = block_activations(s, attention)
    return (4 * fp32 + (2 if precision == "bf16" else 4) * low) * s.tokens


def saved_activation_bytes(s: Shape, images: int, checkpointing: bool, precision: str = "bf16", attention: str = "sdpa") -> float:
    """Bytes that autograd holds at the end of the forward for `images` images (with checkpointing: block inputs)."""
    rest_fp32, rest_low = other_activations(s)
    rest = 4 * rest_fp32 + (2 if precision == "bf16" else 4) * rest_low
    blocks = 4 * s.width * s.tokens if checkpointing else block_activation_bytes(s, precision, attention)
    return images * (s.depth * blocks + rest)


def activation_bytes(s: Shape, images: int, checkpointing: bool, precision: str = "bf16", attention: str = "sdpa") -> float:
    """Peak activation bytes: the saved ones, and with checkpointing the block being recomputed."""
    recomputed = images * block_activation_bytes(s, precision, attention) if checkpointing else 0
    return saved_activation_bytes(s, images, checkpointing, precision, attention) + recomputed


def memory_per_device(
    s: Shape, strategy: str, devices: int, batch: int, checkpointing: bool, precision: str = "bf16", attention: str = "sdpa"
) -> Memory:
    """Parameters, gradients, optimizer state and activations per device (bytes)."""
    check_choice("strategy", strategy, STRATEGIES)
    check_choice("precision", precision, PRECISIONS)
    check_choice("attention", attention, ATTENTIONS)
    p = parameter_count(s)
    activations = activation_bytes(s, math.ceil(batch / devices), checkpointing, precision, attention)
    if strategy == "ddp":
        autocast_copies = 2 * p if precision == "bf16" else 0
        return Memory(params=4 * p + autocast_copies, grads=8 * p, optimizer=8 * p, activations=activations)
    unsharded = (2 * block_parameters(s) + other_parameters(s)) * (2 if precision == "bf16" else 4)
    return Memory(
        params=4 * p / devices + unsharded, grads=4 * p / devices + unsharded, optimizer=8 * p / devices, activations=activations
    )


def flops_per_step(s: Shape, batch: int, checkpointing: bool = False) -> float:
    """Training FLOPs of one step: forward 2·MACs, backward twice the forward, plus the recomputed forward.

    Per image: the patch projection on every patch, per block the weight matmuls on every token
    (4 d² + 2 d·m) and the attention products q kᵀ and p v (2 T² d), the head on the class token.
    """
    d, t = s.width, s.tokens
    block = 2 * t * (4 * d * d + 2 * d * s.mlp_dim) + 4 * t * t * d
    other = 2 * s.patches * s.channels * s.patch**2 * d + 2 * d * s.num_classes
    forward = s.depth * block + other
    return batch * (3 * forward + (s.depth * block if checkpointing else 0))


@dataclass(frozen=True)
class PlanRow:
    """One way to train: its memory per device at the asked device count, and the fewest devices that fit."""

    strategy: str
    checkpointing: bool
    memory: Memory
    fits: bool
    smallest_devices: int | None


def smallest_devices(
    s: Shape, strategy: str, batch: int, checkpointing: bool, budget: float, precision: str = "bf16", attention: str = "sdpa"
) -> int | None:
    """The fewest devices (at most one per image of the batch) whose memory each fits in `budget` bytes."""

    def fits(n: int) -> bool:
        return memory_per_device(s, strategy, n, batch, checkpointing, precision, attention).total <= budget

    if not fits(batch):  # memory per device only falls as devices are added
        return None
    low, high = 1, batch
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


def plan(
    s: Shape, devices: int, device_memory_gib: float, batch: int, precision: str = "bf16", attention: str = "sdpa"
) -> list[PlanRow]:
    """Every strategy with and without activation checkpointing on `devices` devices of `device_memory_gib`."""
    if devices < 1 or batch < 1 or device_memory_gib <= 0:
        raise VitlabError("--devices and --batch must be >= 1 and --device-memory positive")
    budget = device_memory_gib * GIB
    rows = []
    for strategy in STRATEGIES:
        for checkpointing in (False, True):
            memory = memory_per_device(s, strategy, devices, batch, checkpointing, precision, attention)
            fewest = smallest_devices(s, strategy, batch, checkpointing, budget, precision, attention)
            rows.append(PlanRow(strategy, checkpointing, memory, memory.total <= budget, fewest))
    return rows


def format_plan(name: str, s: Shape, devices: int, device_memory_gib: float, batch: int, precision: str = "bf16") -> str:
    """The plan of one preset as a text table (GiB per device)."""
    rows = plan(s, devices, device_memory_gib, batch, precision)
    lines = [
        f"{name} at {s.image_size} px ({s.tokens} tokens): {parameter_count(s):,} parameters; global batch {batch}, "
        f"{precision}, AdamW; {devices} device(s) of {device_memory_gib:g} GiB",
        f"FLOPs per step: {flops_per_step(s, batch):.3g} ({flops_per_step(s, batch, True):.3g} with activation checkpointing)",
        "",
        f"{'strategy':<9}{'checkpointing':<15}{'params':>9}{'grads':>9}{'optimizer':>11}{'activations':>13}"
        f"{'total':>9}  {'fits':<5}{'smallest N':>11}",
    ]
    for r in rows:
        m = r.memory
        gib = [f"{v / GIB:.1f}" for v in (m.params, m.grads, m.optimizer, m.activations, m.total)]
        lines.append(
            f"{r.strategy:<9}{'on' if r.checkpointing else 'off':<15}{gib[0]:>9}{gib[1]:>9}{gib[2]:>11}{gib[3]:>13}"
            f"{gib[4]:>9}  {'yes' if r.fits else 'no':<5}{r.smallest_devices or '-':>11}"
        )
    return "\n".join(lines)


def format_overview(patch: int, device_memory_gib: float, batch: int, image_size: int, precision: str = "bf16") -> str:
    """The fewest devices of `device_memory_gib` for every preset, DDP and FSDP, with and without checkpointing."""
    lines = [
        f"Fewest devices of {device_memory_gib:g} GiB for a global batch of {batch} at {image_size} px, {precision}, AdamW "
        f"('-': none, even with one image per device)",
        f"{'preset':<18}{'parameters':>16}{'ddp':>7}{'ddp+ckpt':>10}{'fsdp':>7}{'fsdp+ckpt':>11}",
    ]
    for family in FAMILIES:
        for size in SIZES:
            name = f"{family}-{size}/{patch}"
            s = preset_shape(name, image_size)
            counts = [r.smallest_devices or "-" for r in plan(s, 1, device_memory_gib, batch, precision)]
            lines.append(f"{name:<18}{parameter_count(s):>16,}" + "".join(f"{c:>{w}}" for c, w in zip(counts, (7, 10, 7, 11))))
    return "\n".join(lines)
