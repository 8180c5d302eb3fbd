"""Run by test_fsdp.py under torchrun with 2 gloo ranks: FSDP2 against single-process references, then a sharded run.

argv: OUT_JSON OUT_DIR. Rank 0 writes the measured differences to OUT_JSON; the run goes to OUT_DIR/fsdp.
"""

import json
import sys

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tests.train.test_classify import TINY
from vitlab import create_model
from vitlab.config import load_config
from vitlab.runtime import distributed
from vitlab.runtime.context import Runtime, start
from vitlab.train.classify import train
from vitlab.train.sharding import wrap_model

# The sharded run: 8 steps per epoch on 2 ranks, checkpoints at steps 6, 12 and the end (16).
RUN = [
    "data.num_train=512",
    "train.strategy=fsdp",
    "train.epochs=2",
    "train.checkpoint_every_steps=6",
    "train.eval_every_epochs=2",
]
SMALL = dict(img_size=16, num_classes=5, depth=3, embed_dim=32, num_heads=2, mlp_dim=64)


def build(name: str, **options):
    return lambda: create_model(name, **SMALL, **options)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a (sharded) model, whole."""
    return {**get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)), **dict(model.named_buffers())}


def init_is_exact(ctx: Runtime, name: str, **options) -> bool:
    """Whether the sharded init equals `torch.manual_seed(7); build()` bit for bit."""
    torch.manual_seed(7)
    reference = build(name, **options)()
    torch.manual_seed(7)
    model, _ = wrap_model(build(name, **options), "fsdp", ctx)
    got, expected = full_state(model), {**reference.state_dict(), **dict(reference.named_buffers())}
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def train_steps(
    model: torch.nn.Module, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32"
):
    """Three AdamW steps on fixed batches; the losses (mean over ranks), gradient norms and final parameters."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, norms = [], []
    for x, y in zip(images, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        norms.append(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(distributed.all_reduce(loss.detach().clone()).item() / distributed.dist.get_world_size())
    return losses, norms, full_state(model)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


def main(out_json: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = start("cpu", "fp32")
    results = {
        "init_exact_vit": init_is_exact(ctx, "vit-ti/8"),
        "init_exact_vit22b_sincos": init_is_exact(ctx, "vit22b-ti/8", pos_embed="sincos", branch_norm="mlp", qkv_bias=True),
        "init_exact_stabilisers": init_is_exact(ctx, "vit22b-ti/8", layer_scale=1e-5, num_registers=2),
        "init_exact_hybrid": init_is_exact(ctx, "hybrid-r50-vit22b-ti/8", stem_width=8, stem_channels=[16, 32], stem_groups=4),
    }

    # The global batch in one process against its two halves on two FSDP ranks (activation checkpointing on).
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(3, 8, 3, 16, 16, generator=gen), torch.randint(0, 5, (3, 8), generator=gen)
    half = slice(4 * ctx.rank, 4 * ctx.rank + 4)
    torch.manual_seed(1)
    reference = build("vit22b-ti/8")()
    ref_losses, ref_norms, ref_state = train_steps(reference, reference, images, labels)
    for key, options in (("fsdp", {}), ("fsdp_cpu_offload", dict(cpu_offload=True))):
        torch.manual_seed(1)
        model, net = wrap_model(build("vit22b-ti/8", grad_checkpointing=True), "fsdp", ctx, **options)
        losses, norms, state = train_steps(model, net, images[:, half], labels[:, half])
        results[key] = dict(
            loss=max(abs(a - b) for a, b in zip(losses, ref_losses)),
            grad_norm=max(abs(a - b) for a, b in zip(norms, ref_norms)),
            params=max_difference(state, ref_state),
        )
    torch.manual_seed(1)
    model, net = wrap_model(build("vit22b-ti/8"), "fsdp", ctx, precision="bf16")
    losses, _, state = train_steps(model, net, images[:, half], labels[:, half], precision="bf16")
    results["bf16"] = dict(
        loss=max(abs(a - b) for a, b in zip(losses, ref_losses)), dtypes=sorted({str(t.dtype) for t in state.values()})
    )

    if ctx.is_main:
        with open(out_json, "w") as f:
            json.dump(results, f)
    train(load_config(None, TINY + RUN + [f"out_dir={out_dir}", "name=fsdp"]), progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
