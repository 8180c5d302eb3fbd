"""Replay the stress study's "Eq. 2 + gradient penalty" variant and take its gradient apart, step by step.

Prints, per step, the norm and max |.| of the cross-entropy's parameter gradient and of the input-gradient
penalty's (README, "Reproducing the paper"). Same data, seed, batches and updates as `vitlab stability
configs/stability/stress.yaml`. Run: PYTHONPATH=src python3 scripts/grad_penalty_parts.py [STEPS]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from vitlab.config import StabilityConfig, load_config
from vitlab.data import load_splits
from vitlab.data.loader import BatchIterator
from vitlab.train.classify import augment_batch, build_model, build_optimizer, penalties
from vitlab.train.runs import step_seed


def norm_and_max(grads: tuple[torch.Tensor | None, ...]) -> tuple[float, float]:
    """Global L2 norm and largest |entry| of a tuple of gradients."""
    found = [g.float() for g in grads if g is not None]
    return torch.sqrt(sum(g.square().sum() for g in found)).item(), max(g.abs().max().item() for g in found)


def main(steps: int = 52) -> None:
    config = load_config("configs/stability/stress.yaml", cls=StabilityConfig).variant_config("vit22b+eq2+grad-penalty")
    d, tc = config.data, config.train
    splits = load_splits(d.name, d.root, d.image_size, num_train=d.num_train, num_test=d.num_test, seed=d.seed)
    torch.manual_seed(tc.seed)
    model = build_model(config, d.image_size, splits.train.num_classes)
    optimizer = build_optimizer(model, config.optim)
    loader = BatchIterator(splits.train, tc.batch_size, seed=tc.seed, rank=0, world_size=1, train=True)
    params = list(model.parameters())
    step = 0
    while step <= steps:
        for images, labels in loader.epoch_batches(step // loader.steps_per_epoch, step % loader.steps_per_epoch):
            gen = torch.Generator().manual_seed(step_seed(tc.seed, step, 0, 0))
            x, y = augment_batch(images, labels, config.augment, gen, splits.train.num_classes)
            logits = model(x.requires_grad_(True))
            loss = F.cross_entropy(logits, y)
            penalty = penalties(loss, logits, x, 0.0, tc.grad_penalty)["grad_penalty"]
            ce = norm_and_max(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
            pen = norm_and_max(torch.autograd.grad(penalty, params, retain_graph=True, allow_unused=True))
            (loss + penalty).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            print(
                f"step {step:3d}  loss {loss.item():.3f}  penalty {penalty.item():.3g}  CE grad norm {ce[0]:.3g} "
                f"max {ce[1]:.3g}  penalty grad norm {pen[0]:.3g} max {pen[1]:.3g}",
                flush=True,
            )
            step += 1
            if step > steps:
                return


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
