"""The planner's arithmetic against what the models really hold: meta-device parameter counts, the tensors
autograd saves for the backward, optimizer state, and PLATFORM.md's FLOP formula."""

import dataclasses

import pytest
import torch

from vitlab import count_parameters, create_model
from vitlab.cli import main
from vitlab.models import FAMILIES, SIZES
from vitlab.models.planner import (
    GIB,
    flops_per_step,
    measured_saved_bytes,
    memory_per_device,
    parameter_count,
    plan,
    preset_shape,
    saved_activation_bytes,
    smallest_devices,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_formula_equals_meta_device_counts_for_every_preset(family):
    for size in SIZES:
        for image_size, patch in ((224, 14), (32, 4)):
            name = f"{family}-{size}/{patch}"
            assert parameter_count(preset_shape(name, image_size, 10)) == count_parameters(
                name, img_size=image_size, num_classes=10
            )


@pytest.mark.parametrize("name,image_size", [("vit-ti/16", 64), ("vit22b-ti/16", 64), ("vit-s/8", 32), ("vit22b-s/16", 48)])
@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_activation_formula_equals_the_bytes_autograd_saves(name, image_size, attention):
    model = create_model(name, img_size=image_size, num_classes=10, attn_impl=attention)
    images, shape = torch.randn(2, 3, image_size, image_size), preset_shape(name, image_size, 10)
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        assert measured_saved_bytes(model, images) == saved_activation_bytes(shape, 2, checkpointing, "fp32", attention)


def test_parameters_gradients_and_adamw_state_are_16_bytes_per_parameter():
    model = create_model("vit22b-ti/8", img_size=32, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    held = sum(p.nbytes + p.grad.nbytes for p in model.parameters())
    held += sum(t.nbytes for state in optimizer.state.values() for t in state.values() if t.ndim)
    shape = preset_shape("vit22b-ti/8", 32, 10)
    memory = memory_per_device(shape, "ddp", 1, 2, False, precision="fp32")
    assert held == memory.params + memory.optimizer + memory.grads / 2  # DDP adds its bucket copy of the gradients


def test_fsdp_shards_state_and_the_smallest_device_count_is_the_first_that_fits():
    shape = preset_shape("vit22b-22b/14")
    ddp, fsdp = (memory_per_device(shape, s, 64, 1024, True) for s in ("ddp", "fsdp"))
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 64) and fsdp.total < ddp.total
    budget = 80 * GIB
    n = smallest_devices(shape, "fsdp", 1024, True, budget)
    assert (
        memory_per_device(shape, "fsdp", n, 1024, True).total
        <= budget
        < memory_per_device(shape, "fsdp", n - 1, 1024, True).total
    )
    assert smallest_devices(shape, "ddp", 1024, True, budget) is None  # 16 bytes x 21.7 B parameters per replica
    rows = {(r.strategy, r.checkpointing): r for r in plan(shape, 8, 80, 1024)}
    assert rows["fsdp", True].memory.activations < rows["fsdp", False].memory.activations / 5


def test_flops_of_the_blocks_follow_platform_md():
    # ../shared/PLATFORM.md: a ViT-S/4 step is 6·B·N·L·12D² + 12·B·L·N²·D FLOPs, 546 GFLOP at depth 6, B=128, N=65.
    shape = dataclasses.replace(preset_shape("vit-s/4", 32, 10), depth=6)
    blocks = flops_per_step(shape, 128) - flops_per_step(dataclasses.replace(shape, depth=0), 128)
    assert blocks == 6 * 128 * 65 * 6 * 12 * 384**2 + 12 * 128 * 6 * 65**2 * 384
    assert blocks == pytest.approx(546e9, rel=0.01)
    recomputed = flops_per_step(shape, 128, checkpointing=True) - flops_per_step(shape, 128)
    assert recomputed == pytest.approx(blocks / 3)


def test_vitlab_plan_prints_every_strategy_and_the_fewest_devices(capsys):
    assert main(["plan", "vit22b-22b/14", "--devices", "16", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "21,756,408,808 parameters" in out and out.count("\nfsdp") == 2 and out.count("\nddp") == 2
    assert main(["plan", "--device-memory", "40"]) == 0
    assert capsys.readouterr().out.count("/16") == len(FAMILIES) * len(SIZES)  # the patch `vitlab params` shows too
    assert main(["plan", "vit-b/15"]) == 2  # not a multiple of the patch size: one line, no traceback
