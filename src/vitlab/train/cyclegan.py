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

import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn
from tqdm import tqdm

from vitlab.config import CycleLossConfig, DiscriminatorConfig, FidConfig, GeneratorConfig, TranslateConfig, from_dict
from vitlab.data.augment import normalize, random_flip
from vitlab.data.unpaired import PAIRINGS, UnpairedData, epoch_length, image_files, load_pair, random_window, read_images
from vitlab.errors import VitlabError
from vitlab.eval.fid import distances, resolve_features
from vitlab.eval.table2 import table2_features, table2_scores
from vitlab.models.ai602 import Ai602Discriminator
from vitlab.models.gan import PatchDiscriminator, ResnetGenerator
from vitlab.models.unet import create_unet
from vitlab.train import checkpoint as ckpt
from vitlab.train.distributed import pick_device
from vitlab.train.precision import autocast, resolve_precision
from vitlab.train.run_log import RunLog, plot_gan_curves, save_image_grid
from vitlab.train.runs import TrainingDiverged, new_run_dir, step_seed

NETWORKS = ("g_a", "g_b", "d_a", "d_b")
DIRECTIONS = ("AtoB", "BtoA")


def lsgan_loss(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean (D(x) − 1)² for real targets, mean D(x)² for fake ones."""
    prediction = prediction.float()
    return F.mse_loss(prediction, torch.full_like(prediction, float(real)))


def lr_factor(step: int, constant_steps: int, total_steps: int) -> float:
    """Multiplier of the base LR: 1 for `constant_steps`, then linear down to 0 at `total_steps`."""
    if step < constant_steps:
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - constant_steps))


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


def build_generator(cfg: GeneratorConfig, image_size: int) -> nn.Module:
    """CycleGAN's ResNet generator (`resnet`) or a ViTUnet with the named backbone preset."""
    if cfg.name == "resnet":
        return ResnetGenerator(**cfg.options)
    return create_unet(cfg.name, img_size=image_size, **cfg.options)


def build_discriminator(d: DiscriminatorConfig) -> nn.Module:
    """CycleGAN's PatchGAN, or the paper code's small sigmoid discriminator (`kind: ai602`)."""
    if d.kind == "ai602":
        return Ai602Discriminator()
    return PatchDiscriminator(base_channels=d.base_channels, num_layers=d.num_layers, norm=d.norm)


def build_networks(config: TranslateConfig) -> nn.ModuleDict:
    """The two generators and the two discriminators of a run."""
    return nn.ModuleDict({
        "g_a": build_generator(config.generator, config.data.crop_size),
        "g_b": build_generator(config.generator, config.data.crop_size),
        "d_a": build_discriminator(config.discriminator),
        "d_b": build_discriminator(config.discriminator),
    })  # fmt: skip


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


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] → uint8 images."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def translate_images(
    generator: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, precision: str
) -> torch.Tensor:
    """uint8 images → the generator's uint8 translations."""
    was_training = generator.training
    generator.eval()
    out = []
    for batch in images.split(batch_size):
        with autocast(device, precision):
            out.append(to_uint8(generator(normalize(batch.to(device)))).cpu())
    generator.train(was_training)
    return torch.cat(out)


def error_to_truth(output: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Mean absolute error (0..1 scale) and mean per-image PSNR (dB, peak 1) of uint8 images against the truth."""
    diff = (output.float() - truth.float()) / 255
    mse = diff.square().flatten(1).mean(1).clamp_min(1e-10)
    return {"l1": diff.abs().mean().item(), "psnr": (-10 * mse.log10()).mean().item()}


def translation_metrics(
    data: UnpairedData, fake_b: torch.Tensor, fake_a: torch.Tensor, fid: FidConfig | None, device: torch.device
) -> dict[str, dict[str, float]]:
    """Per direction: L1/PSNR to the truth (built-in pair) and FID/KID against the real test images,
    each beside the same number for the identity mapping; then their average over both directions.
    With `eval.protocol: paper-table2`, the paper's Table 2 instead (vitlab.eval.table2)."""
    if fid is not None and fid.protocol == "paper-table2":
        features = table2_features(fid.inception_weights)
        names = tuple(fid.domain_names)
        return {"paper-table2": table2_scores(data.test_a, data.test_b, fake_a, fake_b, features, names, fid.batch_size, device)}
    features = resolve_features(fid.features, fid.inception_weights) if fid else []
    sides = {
        "AtoB": (data.test_a, fake_b, data.test_b, data.truth_ab),
        "BtoA": (data.test_b, fake_a, data.test_a, data.truth_ba),
    }
    results = {}
    for direction, (source, fake, real, truth) in sides.items():
        row = {}
        for prefix, images in (("", fake), ("identity_", source)):
            if truth is not None:
                row.update({prefix + k: v for k, v in error_to_truth(images, truth).items()})
            if features:
                found = distances(real, images, features, fid.batch_size, fid.kid_subset_size, device)
                row.update({f"{prefix}{k}_{name}": v for name, values in found.items() for k, v in values.items()})
        results[direction] = row
    results["average"] = {k: (results["AtoB"][k] + results["BtoA"][k]) / 2 for k in results["AtoB"]}
    return results


def sample_grid(
    path: Path, nets: nn.ModuleDict, data: UnpairedData, rows: int, device: torch.device, precision: str
) -> Path:
    """Fig. 4's layout: A, A→B, B, B→A for the first `rows` test images of each domain."""
    rows = min(rows, len(data.test_a), len(data.test_b))
    a, b = data.test_a[:rows], data.test_b[:rows]
    columns = {
        "A": a, "A -> B": translate_images(nets["g_a"], a, rows, device, precision),
        "B": b, "B -> A": translate_images(nets["g_b"], b, rows, device, precision),
    }  # fmt: skip
    return save_image_grid(path, columns)


def load_data(config: TranslateConfig, with_train: bool = True) -> UnpairedData:
    """The run's domain pair."""
    d = config.data
    builtin = dict(num_train=d.num_train, num_test=d.num_test, seed=d.seed, **d.builtin) if d.name == "builtin" else {}
    return load_pair(d.name, d.root, d.load_size, d.crop_size, with_train=with_train, **builtin)


def train_translation(config: TranslateConfig, resume_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train a CycleGAN (or resume one); returns the final metrics."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VitlabError("translate-train runs in a single process; start it without torchrun")
    tc, lc = config.train, config.loss
    device = pick_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    data = load_data(config)
    if config.eval.protocol == "paper-table2":
        table2_features(config.eval.inception_weights)  # refuses now, not after the training, without Inception

    torch.manual_seed(tc.seed)
    nets = build_networks(config).to(device)
    generators = itertools.chain(nets["g_a"].parameters(), nets["g_b"].parameters())
    discriminators = itertools.chain(nets["d_a"].parameters(), nets["d_b"].parameters())
    optimizers = {
        "g": torch.optim.Adam(generators, lr=config.optim.lr, betas=config.optim.betas),
        "d": torch.optim.Adam(discriminators, lr=config.optim.lr, betas=config.optim.betas),
    }
    pools = {"a": ImagePool(lc.pool_size), "b": ImagePool(lc.pool_size)}  # fake A images (for D_B), fake B (for D_A)

    n_a, n_b = len(data.train_a), len(data.train_b)
    steps_per_epoch = epoch_length(config.data.pairing, n_a, n_b, tc.batch_size)
    if steps_per_epoch == 0:
        raise VitlabError(f"train.batch_size={tc.batch_size} is larger than the training sets ({n_a} A, {n_b} B images)")
    total_steps = math.ceil((tc.epochs + tc.decay_epochs) * steps_per_epoch)
    constant_steps = round(tc.epochs * steps_per_epoch)
    eval_every = max(1, round(tc.eval_every_epochs * steps_per_epoch))
    sample_every = max(1, round(tc.sample_every_epochs * steps_per_epoch))

    step = 0
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        checkpoint = ckpt.find_checkpoint(run_dir)
        for name in NETWORKS:
            ckpt.load_weights(checkpoint, nets[name], name)
        ckpt.load_optimizer(checkpoint, optimizers)
        for name, pool in pools.items():
            pool.load_state_dict(ckpt.load_tensors(checkpoint, f"pool_{name}"), device)
        step = ckpt.read_meta(checkpoint)["step"]
    else:
        run_dir = new_run_dir(config)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    log = RunLog(run_dir, resume_step=step if resume_dir else None)

    def save(meta_extra: dict | None = None) -> None:
        tensors = {**{name: nets[name] for name in NETWORKS}, **{f"pool_{k}": p.state_dict() for k, p in pools.items()}}
        meta = {"epoch": step / steps_per_epoch, "config": config.to_dict(), **(meta_extra or {})}
        ckpt.save_checkpoint(run_dir, step, tensors, optimizers, meta, keep=tc.keep_checkpoints)

    bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    bad_in_row, skipped, seen, started = 0, 0, 0, time.perf_counter()
    nets.train()
    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        for idx_a, idx_b in PAIRINGS[config.data.pairing](n_a, n_b, tc.batch_size, epoch, tc.seed)[start:]:
            gen = torch.Generator().manual_seed(step_seed(tc.seed, step, 0, 0))
            torch.manual_seed(step_seed(tc.seed, step, 0, 1))
            real_a = training_batch(data.train_a[idx_a], config.data.crop_size, config.data.hflip, gen).to(device)
            real_b = training_batch(data.train_b[idx_b], config.data.crop_size, config.data.hflip, gen).to(device)
            lr = config.optim.lr * lr_factor(step, constant_steps, total_steps)
            for optimizer in optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = lr

            nets["d_a"].requires_grad_(False)
            nets["d_b"].requires_grad_(False)
            with autocast(device, precision):
                loss_g, parts, fake_a, fake_b = generator_loss(nets, real_a, real_b, lc)
            bad = not torch.isfinite(loss_g).item()
            if not bad:
                loss_g.backward()
                optimizers["g"].step()
                nets["d_a"].requires_grad_(True)
                nets["d_b"].requires_grad_(True)
                with autocast(device, precision):
                    parts["d_a"] = discriminator_loss(nets["d_a"], real_b, pools["b"].query(fake_b, gen))
                    parts["d_b"] = discriminator_loss(nets["d_b"], real_a, pools["a"].query(fake_a, gen))
                loss_d = parts["d_a"] + parts["d_b"]
                bad = not torch.isfinite(loss_d).item()
                if not bad:
                    loss_d.backward()
                    optimizers["d"].step()
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            bad_in_row = bad_in_row + 1 if bad else 0
            skipped += bad
            if bad_in_row >= tc.max_bad_steps:
                last = ckpt.find_checkpoint(run_dir) if (run_dir / "checkpoints").exists() else "none"
                values = ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())
                raise TrainingDiverged(
                    f"training diverged: {bad_in_row} steps in a row with a non-finite loss, the last at step {step} "
                    f"({values}); last good checkpoint: {last}. Lower optim.lr or try the stabilisers "
                    "(generator.options.qk_norm, generator.options.branch_norm=mlp)"
                )
            step += 1
            seen += tc.batch_size
            bar.update(1)

            if step % tc.log_every_steps == 0 or step == total_steps:
                rate = seen / (time.perf_counter() - started)
                losses = {k: v.item() for k, v in parts.items()}
                bar.set_postfix(g=f"{loss_g.item():.3f}", d=f"{losses.get('d_a', math.nan):.3f}", img_s=f"{rate:.1f}")
                log.log("steps", step, {**losses, "lr": lr, "images_per_s": rate, "skipped": skipped})
            if data.has_truth and (step % eval_every == 0 or step == total_steps):
                fakes = translate_test_sets(nets, data, tc.batch_size, device, precision)
                errors = translation_metrics(data, *fakes, None, device)
                row = {f"{k}_{suffix}": v for d, suffix in zip(DIRECTIONS, ("ab", "ba")) for k, v in errors[d].items()}
                log.log("epochs", step, {"epoch": step / steps_per_epoch, **row})
                bar.write(
                    f"epoch {step / steps_per_epoch:.2f}  step {step}  L1 to the truth: A→B {row['l1_ab']:.4f}, "
                    f"B→A {row['l1_ba']:.4f} (identity {row['identity_l1_ab']:.4f}, {row['identity_l1_ba']:.4f})"
                )
            if step % sample_every == 0 or step == total_steps:
                sample_grid(run_dir / "samples" / f"step-{step:08d}.png", nets, data, tc.num_samples, device, precision)
            if step % tc.checkpoint_every_steps == 0 and step < total_steps:
                save()
            if step >= total_steps:
                break
    bar.close()

    elapsed = time.perf_counter() - started
    fakes = translate_test_sets(nets, data, tc.batch_size, device, precision)
    metrics = translation_metrics(data, *fakes, config.eval, device)
    results = {
        "test": metrics, "steps": step, "epochs": step / steps_per_epoch, "skipped_steps": skipped,
        "train_seconds_this_session": elapsed, "train_images_per_s": seen / elapsed if elapsed else None,
        "generator_parameters": sum(p.numel() for p in nets["g_a"].parameters()),
        "discriminator_parameters": sum(p.numel() for p in nets["d_a"].parameters()), "precision": precision,
    }  # fmt: skip
    save({"test": metrics})
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.close()
    plot_gan_curves(run_dir)
    sample_grid(run_dir / "samples.png", nets, data, tc.num_samples, device, precision)
    return {**results, "run_dir": str(run_dir)}


def translate_test_sets(
    nets: nn.ModuleDict, data: UnpairedData, batch_size: int, device: torch.device, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """G_A(test A) and G_B(test B) as uint8 images."""
    fake_b = translate_images(nets["g_a"], data.test_a, batch_size, device, precision)
    fake_a = translate_images(nets["g_b"], data.test_b, batch_size, device, precision)
    return fake_b, fake_a


def load_generators(
    checkpoint: Path, config: TranslateConfig, device: torch.device, names: tuple[str, ...] = ("g_a", "g_b")
) -> dict[str, nn.Module]:
    """The named generators of a checkpoint, with their weights, in eval mode."""
    generators = {}
    for name in names:
        generator = build_generator(config.generator, config.data.crop_size)
        ckpt.load_weights(checkpoint, generator, name)
        generators[name] = generator.to(device).eval()
    return generators


def checkpoint_config(path: str | Path) -> tuple[Path, TranslateConfig]:
    """A translation checkpoint (from itself or its run directory) and its run's config."""
    checkpoint = ckpt.find_checkpoint(path)
    meta = ckpt.read_meta(checkpoint)
    if "generator" not in meta.get("config", {}):
        raise VitlabError(f"{checkpoint} is not an image-translation checkpoint (made by `vitlab translate-train`)")
    return checkpoint, from_dict(TranslateConfig, meta["config"]).validate()


def evaluate_run(
    path: str | Path, features: str | None = None, inception_weights: str | None = None, batch_size: int = 50,
    device: str = "auto",
) -> dict:  # fmt: skip
    """Translate a run's test sets with its last checkpoint; L1/PSNR to the truth (built-in pair), FID and KID."""
    checkpoint, config = checkpoint_config(path)
    fid = config.eval
    fid.features = features or fid.features
    fid.inception_weights = inception_weights or fid.inception_weights
    fid.batch_size = batch_size
    torch_device = pick_device(device)
    precision = resolve_precision(config.train.precision, torch_device)
    data = load_data(config, with_train=False)
    nets = nn.ModuleDict(load_generators(checkpoint, config, torch_device))
    fakes = translate_test_sets(nets, data, batch_size, torch_device, precision)
    metrics = translation_metrics(data, *fakes, fid, torch_device)
    return {"checkpoint": str(checkpoint), "step": ckpt.read_meta(checkpoint)["step"], "test": metrics}


def translate_folder(
    path: str | Path, in_dir: str | Path, out_dir: str | Path, direction: str = "AtoB", batch_size: int = 8,
    device: str = "auto",
) -> list[Path]:  # fmt: skip
    """Translate every image of `in_dir` (resized to the model's size) into PNGs of the same names in `out_dir`."""
    if direction not in DIRECTIONS:
        raise VitlabError(f"direction={direction!r} is not supported; allowed: {', '.join(DIRECTIONS)}")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir() or not (files := image_files(in_dir)):
        raise VitlabError(f"{in_dir} is not a folder of .png/.jpg/.jpeg images")
    checkpoint, config = checkpoint_config(path)
    torch_device = pick_device(device)
    name = "g_a" if direction == "AtoB" else "g_b"
    generator = load_generators(checkpoint, config, torch_device, (name,))[name]
    precision = resolve_precision(config.train.precision, torch_device)
    outputs = translate_images(generator, read_images(files, config.data.crop_size), batch_size, torch_device, precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file, image in zip(files, outputs):
        written.append(out_dir / f"{file.stem}.png")
        Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(written[-1])
    return written
