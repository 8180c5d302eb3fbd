"""Self-supervised pretraining (MAE or MPP) of an encoder on unlabeled images: one plain loop on the run scaffold.

Each step: crop and flip a batch (labels are ignored; in memory, or streamed from folders and shards
as in classification), mask it, and minimise the method's loss (vitlab.models.masked). Randomness
(augmentation, masks) is derived from (seed, step, rank) as in the classification loop and the LR is
a function of the step, so a resumed run continues exactly.
A checkpoint holds the encoder as `model.safetensors` (a classifier's tensors minus the head, so
`finetune.checkpoint: RUN` loads it like any vitlab run) and the rest as `decoder.safetensors`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vitlab.config import PretrainConfig
from vitlab.data.augment import augment_batch, fit_augment, normalize
from vitlab.data.sources import MemoryEval, StreamEval, run_data
from vitlab.errors import VitlabError
from vitlab.figures import log_y, new_figure, plot_curve, save_figure, save_image_grid
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.builders import build_pretraining
from vitlab.runs.kinds import check_experiment
from vitlab.runtime import distributed
from vitlab.runtime.context import Runtime, start
from vitlab.runtime.precision import autocast
from vitlab.train import sharding
from vitlab.train.optim import build_optimizer
from vitlab.train.run_log import read_csv
from vitlab.train.scaffold import Run, step_seed
from vitlab.train.schedule import lr_factor, warmup_steps
from vitlab.train.step import OptimizerStep

ENCODER = "encoder."


def split_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's tensor files: the encoder as `model`, everything else as `decoder`."""
    state = model.state_dict()
    return {
        "model": {k[len(ENCODER) :]: v for k, v in state.items() if k.startswith(ENCODER)},
        "decoder": {k: v for k, v in state.items() if not k.startswith(ENCODER)},
    }


def load_state(checkpoint: Path, model: nn.Module) -> None:
    """Load a pretraining checkpoint's encoder and decoder into `model`."""
    tensors = {ENCODER + k: v for k, v in ckpt.load_tensors(checkpoint, "model").items()}
    ckpt.fit_state_dict(model, tensors | ckpt.load_tensors(checkpoint, "decoder"), checkpoint / "model.safetensors")


def to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images back to uint8."""
    scale = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    shift = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    return ((x.float() * scale + shift).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def held_out_loss(
    model: nn.Module,
    held_out: MemoryEval | StreamEval,
    batch_size: int,
    ctx: Runtime,
    seed: int,
    precision: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> float:
    """The mean loss over the held-out split, strided across ranks; masks drawn from `seed` (the same at every evaluation)."""
    model.eval()
    torch.manual_seed(seed + ctx.rank)
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for images, _, _ in held_out.batches(batch_size, ctx.rank, ctx.world_size):
        with autocast(ctx.device, precision):
            sums[0] += model(normalize(images.to(ctx.device), mean, std)).double() * len(images)
        sums[1] += len(images)
    model.train()
    total, count = distributed.all_reduce(sums).tolist()
    return total / max(count, 1)


def first_images(held_out: MemoryEval | StreamEval, count: int) -> torch.Tensor:
    """The first `count` held-out images (uint8), for the sample grids."""
    images, _, _ = next(iter(held_out.batches(count, rank=0, world_size=1)))
    return images[:count]


@torch.no_grad()
def sample_grid(
    path: Path,
    model: nn.Module,
    images: torch.Tensor,
    ctx: Runtime,
    seed: int,
    precision: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> Path:
    """MAE Fig. 2: original, masked and reconstruction of each image, one image per row."""
    model.eval()
    torch.manual_seed(seed)
    x = normalize(images.to(ctx.device), mean, std)
    with autocast(ctx.device, precision):
        masked, reconstruction = model.reconstruct(x)
    model.train()
    columns = {"original": images, "masked": masked, "reconstruction": reconstruction}
    return save_image_grid(path, {k: v if v.dtype == torch.uint8 else to_uint8(v, mean, std) for k, v in columns.items()})


def plot_pretrain_curves(run_dir: Path) -> Path:
    """Draw the training and held-out losses and the learning rate into curves.png."""
    steps = read_csv(run_dir / "steps.csv")
    epochs = read_csv(run_dir / "epochs.csv") if (run_dir / "epochs.csv").is_file() else {}
    fig = new_figure(10, 3.8)
    axes = fig.subplots(1, 2)
    plot_curve(axes[0], steps["step"], steps["loss"], lw=0.8, label="training")
    if epochs:
        axes[0].plot(epochs["step"], epochs["test_loss"], marker="o", label="held out")
    axes[0].set(title="pretraining loss", xlabel="step")
    log_y(axes[0])
    axes[0].legend(fontsize=8)
    plot_curve(axes[1], steps["step"], steps["lr"], lw=0.8)
    axes[1].set(title="learning rate", xlabel="step")
    return save_figure(fig, run_dir / "curves.png", axes)


def pretrain(config: PretrainConfig, resume_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Pretrain an encoder with MAE or MPP (or resume a run: a run directory, or `auto`); returns the final losses.

    Under torchrun with `train.strategy: ddp`, each rank masks its share of the global batch and
    DistributedDataParallel averages the gradients.
    """
    check_experiment(config)  # configs built in code get the checks `load_experiment` makes
    ctx = start(config.train.device, config.train.precision, config.train.threads)
    try:
        return _pretrain(config, ctx, resume_dir, progress)
    finally:
        distributed.teardown()


def _pretrain(config: PretrainConfig, ctx: Runtime, resume_dir: str | Path | None, progress: bool) -> dict:
    tc, oc, data, p = config.train, config.optim, config.data, config.pretrain
    precision, precision_reason = ctx.precision, ctx.precision_reason
    if tc.batch_size % ctx.world_size:
        raise VitlabError(f"train.batch_size={tc.batch_size} (global) must be divisible by the {ctx.world_size} ranks")
    per_rank = tc.batch_size // ctx.world_size
    flip_prob = config.augment.flip_prob if config.augment.hflip else 0.0  # streamed images flip in the workers
    sources = run_data(data, per_rank, tc.seed, ctx.rank, ctx.world_size, flip_prob=flip_prob)  # labels unused
    augment, augment_said = fit_augment(config.augment, sources.streamed)
    steps_per_epoch = sources.train.steps_per_epoch
    if steps_per_epoch == 0:
        raise VitlabError(f"train.batch_size={tc.batch_size} is larger than the {sources.train_size} training images")
    total_steps = math.ceil(tc.epochs * steps_per_epoch)
    warmup = warmup_steps(oc, steps_per_epoch)
    eval_every = max(1, round(tc.eval_every_epochs * steps_per_epoch))
    samples = first_images(sources.test, p.num_samples)

    with Run(config, ctx, resume_dir, total_steps, steps_per_epoch, progress) as run:
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        model, net = sharding.wrap_model(
            lambda: build_pretraining(config, data.image_size), tc.strategy, ctx, precision, tc.compile
        )
        optimizer = build_optimizer(model, oc)
        stepper = OptimizerStep(precision, ctx.device, oc.clip_grad_norm, oc.clip_grad_value)
        if run.checkpoint is not None:
            load_state(run.checkpoint, model)
            ckpt.load_optimizer(run.checkpoint, optimizer)
            stepper.load_state_dict(ckpt.read_meta(run.checkpoint))
        (run.dir / "samples").mkdir(exist_ok=True)
        encoder_params = sum(t.numel() for t in model.encoder.parameters())
        run.announce(
            {
                "device": f"{ctx.device}, {ctx.world_size} process(es), strategy {tc.strategy if ctx.distributed else 'single'}",
                "precision": f"{precision} (train.precision: {tc.precision}: {precision_reason})",
                "method": f"{p.method}, mask ratio {model.mask_ratio:g}",
                "model": f"{config.model.name}: {encoder_params:,} encoder parameters "
                f"(+ {sum(t.numel() for t in model.parameters()) - encoder_params:,} dropped after pretraining)",
                "data": f"{data.name}{' (streamed)' if sources.streamed else ''}: {sources.train_size:,} unlabeled training / "
                f"{sources.test.size:,} held-out images, {data.image_size} px",
                "steps": f"{total_steps:,} ({steps_per_epoch:,} per epoch × {tc.epochs:g} epochs) of batch {tc.batch_size}",
                **sources.notes,
                **augment_said,
            }
        )

        def save(extra: dict | None = None) -> None:
            run.save(split_state(model), optimizer, {"method": p.method, **stepper.state_dict(), **(extra or {})})

        def evaluation_args() -> tuple:
            return ctx, tc.seed, precision, data.mean, data.std

        model.train()
        while run.step < total_steps:
            epoch, start = divmod(run.step, steps_per_epoch)
            for images, labels in run.batches(sources.train.epoch(epoch, start)):
                step = run.step
                gen = torch.Generator().manual_seed(step_seed(tc.seed, step, ctx.rank, 0))
                torch.manual_seed(step_seed(tc.seed, step, ctx.rank, 1))  # the masks differ from rank to rank
                x, _ = augment_batch(
                    images,
                    labels,
                    augment,
                    gen,
                    sources.num_classes,
                    data.mean,
                    data.std,
                    cropped=sources.streamed,
                    crop_scale=data.crop_scale,
                )
                lr = oc.lr * lr_factor(step, total_steps, warmup, oc)
                run.set_lr(optimizer, lr)
                with autocast(ctx.device, precision):
                    loss = net(x.to(ctx.device, non_blocking=True))
                stepper.backward(loss)
                result = stepper.step(optimizer, model.parameters(), loss)
                grad_norm = result.grad_norm
                stepper.update()
                optimizer.zero_grad(set_to_none=True)
                run.count(result.finite, result.overflow)
                if run.diverged:
                    run.log(
                        "steps",
                        dict(loss=loss.item(), lr=lr, grad_norm=grad_norm.item(), images_per_s=0.0, skipped=run.skipped),
                        step=step + 1,
                    )
                    raise run.divergence(
                        "loss or gradient",
                        f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}",
                        "Lower optim.lr or set optim.clip_grad_norm",
                    )
                run.advance(tc.batch_size)

                if run.due(tc.log_every_steps):
                    rate = run.images_per_s
                    mean_loss = distributed.all_reduce(loss.detach().float().clone()).item() / ctx.world_size
                    values = dict(loss=mean_loss, lr=lr, grad_norm=grad_norm.item(), images_per_s=rate, skipped=run.skipped)
                    run.log("steps", values, postfix=dict(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}"))
                if run.due(eval_every):
                    test_loss = held_out_loss(model, sources.test, tc.batch_size, *evaluation_args())
                    run.write(f"epoch {run.epoch:.2f}  step {run.step}  held-out {p.method} loss {test_loss:.4f}")
                    run.log("epochs", {"epoch": run.epoch, "test_loss": test_loss})
                if run.due(p.sample_every_steps) and ctx.is_main:
                    path = run.dir / "samples" / f"step-{run.step:08d}.png"
                    run.image("samples", sample_grid(path, model, samples, *evaluation_args()))
                run.end_step(save)
                if run.step >= total_steps:
                    break

        run.check_stepped()
        elapsed = run.elapsed()
        test_loss = held_out_loss(model, sources.test, tc.batch_size, *evaluation_args())
        results = {
            "test": {"loss": test_loss},
            "method": p.method,
            "steps": run.step,
            "epochs": run.epoch,
            "skipped_steps": run.skipped,
            "train_seconds_this_session": elapsed,
            "train_images_per_s": run.seen / elapsed if run.seen else None,
            "encoder_parameters": encoder_params,
            "precision": precision,
            "world_size": ctx.world_size,
            "max_rank_param_difference": distributed.max_rank_difference(model),
        }
        save({"test": {"loss": test_loss}})
        return run.finish(results, plot_pretrain_curves)
