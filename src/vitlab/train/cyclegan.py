"""CycleGAN training of ViTUnet or the ResNet generator against PatchGANs (paper §4): one plain loop.

Names follow CycleGAN (Zhu et al. 2017): G_A maps A → B and D_A judges B images (real B against
G_A's fakes); G_B maps B → A and D_B judges A images. Every step:
  generators:     LSGAN loss of D_A(G_A(a)) and D_B(G_B(b)) against "real",
                  + λ·|G_B(G_A(a)) − a|₁ + λ·|G_A(G_B(b)) − b|₁                 (cycle, λ = 10)
                  + λ_idt·λ·(|G_A(b) − b|₁ + |G_B(a) − a|₁)                      (identity, λ_idt = 0.5),
                  one Adam step for both generators, the discriminators frozen;
  discriminators: ½·(LSGAN(D(real), real) + LSGAN(D(fake from a pool of 50), fake)) each,
                  one Adam step for both.
Randomness is derived from (seed, step) as in the classification loop, the LR is a function of the
step, and the image pools are saved in the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.config import CycleLossConfig, TranslateConfig
from vitlab.data.augment import normalize, random_flip
from vitlab.data.unpaired import PAIRINGS, epoch_length, random_window
from vitlab.errors import VitlabError
from vitlab.eval.table2 import table2_features
from vitlab.eval.translation import DIRECTIONS, load_data, sample_grid, translate_test_sets, translation_metrics
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.builders import build_discriminator, build_generator
from vitlab.runs.kinds import check_experiment
from vitlab.runtime.context import local
from vitlab.runtime.precision import autocast
from vitlab.train.run_log import plot_gan_curves
from vitlab.train.scaffold import Run, step_seed
from vitlab.train.schedule import constant_then_linear
from vitlab.train.step import OptimizerStep

NETWORKS = ("g_a", "g_b", "d_a", "d_b")


def lsgan_loss(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean (D(x) − 1)² for real targets, mean D(x)² for fake ones."""
    prediction = prediction.float()
    return F.mse_loss(prediction, torch.full_like(prediction, float(real)))


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al. 2017), shown to the discriminator.

    Until the pool holds `size` images each new fake is stored and passed through; after that, each
    fake is passed through with probability ½, or else swapped for a random stored one that it replaces.
    """

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, fakes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The batch the discriminator sees in place of `fakes` (detached)."""
        fakes = fakes.detach()
        if self.size == 0:
            return fakes
        out = []
        for fake in fakes:
            if len(self.images) < self.size:
                self.images.append(fake.clone())
                out.append(fake)
            elif torch.rand((), generator=gen) < 0.5:
                i = int(torch.randint(len(self.images), (), generator=gen))
                out.append(self.images[i])
                self.images[i] = fake.clone()
            else:
                out.append(fake)
        return torch.stack(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored images as one tensor (for the checkpoint)."""
        return {"images": torch.stack(self.images) if self.images else torch.zeros(0)}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Restore the stored images."""
        self.images = [image.to(device) for image in state["images"]]


def build_networks(config: TranslateConfig) -> nn.ModuleDict:
    """The two generators and the two discriminators of a run."""
    return nn.ModuleDict(
        {
            "g_a": build_generator(config.generator, config.data.crop_size),
            "g_b": build_generator(config.generator, config.data.crop_size),
            "d_a": build_discriminator(config.discriminator),
            "d_b": build_discriminator(config.discriminator),
        }
    )


def generator_loss(
    nets: nn.ModuleDict, real_a: torch.Tensor, real_b: torch.Tensor, cfg: CycleLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Total generator loss, its weighted parts, and the fakes (G_B(b), G_A(a))."""
    fake_b, fake_a = nets["g_a"](real_a), nets["g_b"](real_b)
    parts = {
        "gan_a": lsgan_loss(nets["d_a"](fake_b), True),
        "gan_b": lsgan_loss(nets["d_b"](fake_a), True),
        "cycle_a": cfg.lambda_cycle * F.l1_loss(nets["g_b"](fake_b).float(), real_a),
        "cycle_b": cfg.lambda_cycle * F.l1_loss(nets["g_a"](fake_a).float(), real_b),
    }
    if cfg.lambda_identity > 0:
        weight = cfg.lambda_identity * cfg.lambda_cycle
        parts["idt_a"] = weight * F.l1_loss(nets["g_a"](real_b).float(), real_b)
        parts["idt_b"] = weight * F.l1_loss(nets["g_b"](real_a).float(), real_a)
    return sum(parts.values()), parts, fake_a, fake_b


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """½·(LSGAN(D(real), real) + LSGAN(D(fake), fake)): halved to slow D relative to G, as CycleGAN does."""
    return 0.5 * (lsgan_loss(discriminator(real), True) + lsgan_loss(discriminator(fake.detach()), False))


def training_batch(images: torch.Tensor, crop_size: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """uint8 images at load size → random crop, random flip, [-1, 1] floats."""
    images = random_window(images, crop_size, gen)
    if hflip:
        images = random_flip(images, gen)
    return normalize(images)


def train_translation(config: TranslateConfig, resume_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train a CycleGAN (or resume one: a run directory, or `auto`); returns the final metrics."""
    check_experiment(config)  # configs built in code get the checks `load_experiment` makes
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VitlabError("translate-train runs in a single process; start it without torchrun")
    tc, lc = config.train, config.loss
    ctx = local(tc.device, tc.precision, tc.threads)
    device, precision, precision_reason = ctx.device, ctx.precision, ctx.precision_reason
    data = load_data(config)
    if config.eval.protocol == "paper-table2":
        table2_features(config.eval.inception_weights)  # refuses now, not after the training, without Inception
    n_a, n_b = len(data.train_a), len(data.train_b)
    steps_per_epoch = epoch_length(config.data.pairing, n_a, n_b, tc.batch_size)
    if steps_per_epoch == 0:
        raise VitlabError(f"train.batch_size={tc.batch_size} is larger than the training sets ({n_a} A, {n_b} B images)")
    total_steps = math.ceil((tc.epochs + tc.decay_epochs) * steps_per_epoch)
    constant_steps = round(tc.epochs * steps_per_epoch)
    eval_every = max(1, round(tc.eval_every_epochs * steps_per_epoch))
    sample_every = max(1, round(tc.sample_every_epochs * steps_per_epoch))

    with Run(config, ctx, resume_dir, total_steps, steps_per_epoch, progress) as run:
        torch.manual_seed(tc.seed)
        nets = build_networks(config).to(device)
        generator_params = [*nets["g_a"].parameters(), *nets["g_b"].parameters()]
        discriminator_params = [*nets["d_a"].parameters(), *nets["d_b"].parameters()]
        optimizers = {
            "g": torch.optim.Adam(generator_params, lr=config.optim.lr, betas=config.optim.betas),
            "d": torch.optim.Adam(discriminator_params, lr=config.optim.lr, betas=config.optim.betas),
        }
        pools = {"a": ImagePool(lc.pool_size), "b": ImagePool(lc.pool_size)}  # fake A images (for D_B), fake B (for D_A)
        stepper = OptimizerStep(precision, device)  # one loss scale for both optimizers
        if run.checkpoint is not None:
            stepper.load_state_dict(ckpt.read_meta(run.checkpoint))
            for name in NETWORKS:
                ckpt.load_weights(run.checkpoint, nets[name], name)
            ckpt.load_optimizer(run.checkpoint, optimizers)
            for name, pool in pools.items():
                pool.load_state_dict(ckpt.load_tensors(run.checkpoint, f"pool_{name}"), device)
        (run.dir / "samples").mkdir(exist_ok=True)
        run.announce(
            {
                "device": str(device),
                "precision": f"{precision} (train.precision: {tc.precision}: {precision_reason})",
                "generators": f"{config.generator.name}: {sum(p.numel() for p in nets['g_a'].parameters()):,} parameters each",
                "data": f"{config.data.name}: {n_a:,} A / {n_b:,} B training images, {config.data.crop_size} px crops",
                "steps": f"{total_steps:,} ({steps_per_epoch:,} per epoch × {tc.epochs + tc.decay_epochs:g} epochs) of batch {tc.batch_size}",
            }
        )

        def save(extra: dict | None = None) -> None:
            tensors = {**{name: nets[name] for name in NETWORKS}, **{f"pool_{k}": p.state_dict() for k, p in pools.items()}}
            run.save(tensors, optimizers, {**stepper.state_dict(), **(extra or {})})

        nets.train()
        while run.step < total_steps:
            epoch, start = divmod(run.step, steps_per_epoch)
            for idx_a, idx_b in PAIRINGS[config.data.pairing](n_a, n_b, tc.batch_size, epoch, tc.seed)[start:]:
                step = run.step
                gen = torch.Generator().manual_seed(step_seed(tc.seed, step, 0, 0))
                torch.manual_seed(step_seed(tc.seed, step, 0, 1))
                real_a = training_batch(data.train_a[idx_a], config.data.crop_size, config.data.hflip, gen).to(device)
                real_b = training_batch(data.train_b[idx_b], config.data.crop_size, config.data.hflip, gen).to(device)
                lr = config.optim.lr * constant_then_linear(step, constant_steps, total_steps)
                run.set_lr(optimizers, lr)

                nets["d_a"].requires_grad_(False)
                nets["d_b"].requires_grad_(False)
                with autocast(device, precision):
                    loss_g, parts, fake_a, fake_b = generator_loss(nets, real_a, real_b, lc)
                stepper.backward(loss_g)
                result = stepper.step(optimizers["g"], generator_params, loss_g)
                if result.finite:
                    nets["d_a"].requires_grad_(True)
                    nets["d_b"].requires_grad_(True)
                    with autocast(device, precision):
                        parts["d_a"] = discriminator_loss(nets["d_a"], real_b, pools["b"].query(fake_b, gen))
                        parts["d_b"] = discriminator_loss(nets["d_b"], real_a, pools["a"].query(fake_a, gen))
                    loss_d = parts["d_a"] + parts["d_b"]
                    stepper.backward(loss_d)
                    result = stepper.step(optimizers["d"], discriminator_params, loss_d)
                stepper.update()
                for optimizer in optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                run.count(result.finite, result.overflow)
                if run.diverged:
                    raise run.divergence(
                        "loss",
                        ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items()),
                        "Lower optim.lr or try the stabilisers (generator.options.qk_norm, generator.options.branch_norm=mlp)",
                    )
                run.advance(tc.batch_size)

                if run.due(tc.log_every_steps):
                    rate = run.images_per_s
                    losses = {k: v.item() for k, v in parts.items()}
                    postfix = dict(g=f"{loss_g.item():.3f}", d=f"{losses.get('d_a', math.nan):.3f}", img_s=f"{rate:.1f}")
                    run.log("steps", {**losses, "lr": lr, "images_per_s": rate, "skipped": run.skipped}, postfix)
                if data.has_truth and run.due(eval_every):
                    fakes = translate_test_sets(nets, data, tc.batch_size, device, precision)
                    errors = translation_metrics(data, *fakes, None, device)
                    row = {f"{k}_{suffix}": v for d, suffix in zip(DIRECTIONS, ("ab", "ba")) for k, v in errors[d].items()}
                    run.log("epochs", {"epoch": run.epoch, **row})
                    run.write(
                        f"epoch {run.epoch:.2f}  step {run.step}  L1 to the truth: A→B {row['l1_ab']:.4f}, "
                        f"B→A {row['l1_ba']:.4f} (identity {row['identity_l1_ab']:.4f}, {row['identity_l1_ba']:.4f})"
                    )
                if run.due(sample_every):
                    run.image(
                        "samples",
                        sample_grid(
                            run.dir / "samples" / f"step-{run.step:08d}.png", nets, data, tc.num_samples, device, precision
                        ),
                    )
                run.end_step(save)
                if run.step >= total_steps:
                    break

        run.check_stepped()
        elapsed = run.elapsed()
        fakes = translate_test_sets(nets, data, tc.batch_size, device, precision)
        metrics = translation_metrics(data, *fakes, config.eval, device)
        results = {
            "test": metrics,
            "steps": run.step,
            "epochs": run.epoch,
            "skipped_steps": run.skipped,
            "train_seconds_this_session": elapsed,
            "train_images_per_s": run.seen / elapsed if run.seen else None,
            "generator_parameters": sum(p.numel() for p in nets["g_a"].parameters()),
            "discriminator_parameters": sum(p.numel() for p in nets["d_a"].parameters()),
            "precision": precision,
        }
        save({"test": metrics})
        results = run.finish(results, plot_gan_curves)
        sample_grid(run.dir / "samples.png", nets, data, tc.num_samples, device, precision)
        return results
