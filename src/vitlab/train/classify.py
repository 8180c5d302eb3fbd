"""Classification training from scratch: one plain loop, read top to bottom.

Randomness is derived from (seed, step, rank) at every step — augmentation through its own
generator, dropout and stochastic depth through the global one — in the manner of big_vision's
`fold_in`. A resumed run therefore needs no saved RNG state to continue bit-exactly, and the LR
is a pure function of the step, so the step is the whole scheduler state.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab.config import RunConfig
from vitlab.data.augment import augment_batch, fit_augment
from vitlab.data.sources import run_data
from vitlab.errors import VitlabError
from vitlab.eval.classification import classification_metrics, dataset_logits, evaluate
from vitlab.eval.figures import save_confusion_matrix
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.builders import build_model
from vitlab.runs.kinds import check_experiment
from vitlab.runtime import distributed
from vitlab.runtime.context import Runtime, start
from vitlab.runtime.precision import autocast
from vitlab.train import sharding
from vitlab.train.finetune import prepare_model
from vitlab.train.monitors import LossAboveStart, StabilityMonitor
from vitlab.train.optim import build_optimizer
from vitlab.train.run_log import plot_curves
from vitlab.train.scaffold import Run, TrainingDiverged, step_seed
from vitlab.train.schedule import lr_factor, warmup_steps
from vitlab.train.step import OptimizerStep


def penalties(
    loss: torch.Tensor, logits: torch.Tensor, images: torch.Tensor, z_loss: float, grad_penalty: float
) -> dict[str, torch.Tensor]:
    """The optional stabilising terms added to the loss, by name.

    z_loss:       z_loss · mean(logsumexp(logits)²), PaLM's auxiliary loss (Chowdhery et al. 2022);
    grad_penalty: grad_penalty · mean over images of ‖∂loss/∂image‖², double backpropagation
                  (Drucker & LeCun 1992); `images` must require grad.
    """
    terms = {}
    if z_loss:
        terms["z_loss"] = z_loss * torch.logsumexp(logits.float(), dim=-1).square().mean()
    if grad_penalty:
        (input_grad,) = torch.autograd.grad(loss, images, create_graph=True)
        terms["grad_penalty"] = grad_penalty * input_grad.square().sum(dim=(1, 2, 3)).mean()
    return terms


def train(config: RunConfig, resume_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train a classifier from scratch (or resume one: a run directory, or `auto`); returns the final test metrics."""
    check_experiment(config)  # configs built in code get the checks `load_experiment` makes
    ctx = start(config.train.device, config.train.precision, config.train.threads)
    try:
        return _train(config, ctx, resume_dir, progress)
    finally:
        distributed.teardown()


def _train(config: RunConfig, ctx: Runtime, resume: str | Path | None, progress: bool) -> dict:
    tc, oc = config.train, config.optim
    precision, precision_reason = ctx.precision, ctx.precision_reason
    data = config.data
    if tc.batch_size % ctx.world_size:
        raise VitlabError(f"train.batch_size={tc.batch_size} (global) must be divisible by the {ctx.world_size} ranks")
    per_rank = tc.batch_size // ctx.world_size
    if per_rank % tc.accumulate_steps:
        raise VitlabError(
            f"train.batch_size={tc.batch_size} over {ctx.world_size} rank(s) is {per_rank} per rank, "
            f"which train.accumulate_steps={tc.accumulate_steps} must divide"
        )
    flip_prob = config.augment.flip_prob if config.augment.hflip else 0.0  # streamed images flip in the workers
    sources = run_data(data, per_rank, tc.seed, ctx.rank, ctx.world_size, flip_prob=flip_prob)
    augment, augment_said = fit_augment(config.augment, sources.streamed)
    num_classes = sources.num_classes
    steps_per_epoch = sources.train.steps_per_epoch
    if steps_per_epoch == 0:
        raise VitlabError(f"train.batch_size={tc.batch_size} is larger than the {sources.train_size} training images per rank")
    total_steps = math.ceil(tc.epochs * steps_per_epoch)
    warmup = warmup_steps(oc, steps_per_epoch)
    eval_every = max(1, round(tc.eval_every_epochs * steps_per_epoch))

    def evaluate_on(split, network) -> dict[str, float]:
        return evaluate(network, split, tc.batch_size, ctx, precision, data.mean, data.std)

    with Run(config, ctx, resume, total_steps, steps_per_epoch, progress) as run:
        torch.manual_seed(tc.seed)
        finetuned: dict[str, str] = {}  # the start block's line on the pretrained weights, when fine-tuning

        def build() -> torch.nn.Module:
            model, said = prepare_model(
                build_model(config, data.image_size, num_classes), config.finetune, run.checkpoint is None
            )
            finetuned.update({"finetune": said} if said else {})
            return model

        model, net = sharding.wrap_model(
            build,
            tc.strategy,
            ctx,
            precision,
            tc.compile,
            tc.cpu_offload,
        )
        monitor = StabilityMonitor(model)
        optimizer = build_optimizer(model, oc)
        ema = (
            torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tc.ema_decay))
            if tc.ema_decay
            else None
        )
        stepper = OptimizerStep(precision, ctx.device, oc.clip_grad_norm, oc.clip_grad_value)
        meta = {} if run.checkpoint is None else ckpt.read_meta(run.checkpoint)
        above_start = LossAboveStart(tc.divergence_patience, meta)
        if run.checkpoint is not None:
            sharding.load_checkpoint(run.checkpoint, model, optimizer)
            stepper.load_state_dict(meta)
            if ema is not None:
                ckpt.load_weights(run.checkpoint, ema.module, "ema")
                ema.n_averaged.fill_(run.step)  # non-zero: the next update averages instead of copying

        run.announce(
            {
                "device": f"{ctx.device}, {ctx.world_size} process(es), strategy {tc.strategy if ctx.distributed else 'single'}",
                "precision": f"{precision} (train.precision: {tc.precision}: {precision_reason})",
                "model": f"{config.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters",
                "data": f"{data.name}{' (streamed)' if sources.streamed else ''}: {sources.train_size:,} training"
                f"{f' / {sources.minival.size:,} minival' if sources.minival else ''} / {sources.test.size:,} test images, "
                f"{num_classes} classes, {data.image_size} px",
                "steps": f"{total_steps:,} ({steps_per_epoch:,} per epoch × {tc.epochs:g} epochs) of batch {tc.batch_size}",
                **sources.notes,
                **augment_said,
                **finetuned,
            }
        )

        def save(extra: dict | None = None) -> None:
            meta = {"num_classes": num_classes, "classes": sources.classes, **stepper.state_dict(), **(extra or {})}
            if tc.divergence_patience:
                meta |= above_start.state_dict()
            run.save(model, optimizer, meta, ema.module if ema else None)

        def log_evaluation(wait: float) -> dict[str, float]:
            network = ema.module if ema else model
            metrics = {f"test_{k}": v for k, v in evaluate_on(sources.test, network).items()}
            if sources.minival:
                metrics |= {f"val_{k}": v for k, v in evaluate_on(sources.minival, network).items()}
            val = f"minival acc@1 {100 * metrics['val_acc1']:.2f} %, " if sources.minival else ""
            run.write(
                f"epoch {run.epoch:.2f}  step {run.step}  {val}test acc@1 {100 * metrics['test_acc1']:.2f} %  "
                f"(data wait {100 * wait:.1f} % of the step time)"
            )
            run.log("epochs", {"epoch": run.epoch, "data_wait": wait, **metrics})
            run.data_wait()  # the evaluation is not training time
            return metrics

        if tc.divergence_patience and above_start.l0 is None:
            above_start.l0 = log_evaluation(0.0)["test_loss"]  # ℓ₀, logged as the evaluation at step 0
        net.train()
        while run.step < total_steps:
            epoch, start = divmod(run.step, steps_per_epoch)
            for images, labels in run.batches(sources.train.epoch(epoch, start)):
                step = run.step
                gen = torch.Generator().manual_seed(step_seed(tc.seed, step, ctx.rank, 0))
                torch.manual_seed(step_seed(tc.seed, step, ctx.rank, 1))
                images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
                x, targets = augment_batch(
                    images,
                    labels,
                    augment,
                    gen,
                    num_classes,
                    data.mean,
                    data.std,
                    cropped=sources.streamed,
                    crop_scale=data.crop_scale,
                )
                lr = oc.lr * lr_factor(step, total_steps, warmup, oc)
                run.set_lr(optimizer, lr)

                logged = (step + 1) % tc.log_every_steps == 0 or step + 1 == total_steps
                loss, extra = torch.zeros((), device=ctx.device), {}
                for i, (xm, tm) in enumerate(zip(x.tensor_split(tc.accumulate_steps), targets.tensor_split(tc.accumulate_steps))):
                    last = i == tc.accumulate_steps - 1
                    xm.requires_grad_(tc.grad_penalty > 0)
                    with sharding.gradient_sync(net, last), monitor.watch(logged and last):
                        with autocast(ctx.device, precision):
                            logits = net(xm)
                        micro_loss = F.cross_entropy(logits.float(), tm, label_smoothing=tc.label_smoothing)
                        micro_extra = penalties(micro_loss, logits, xm, tc.z_loss, tc.grad_penalty)
                        stepper.backward((micro_loss + sum(micro_extra.values())) / tc.accumulate_steps)
                    loss = loss + micro_loss.detach() / tc.accumulate_steps
                    extra = {k: extra.get(k, 0) + v.detach() / tc.accumulate_steps for k, v in micro_extra.items()}
                result = stepper.step(optimizer, model.parameters(), loss)
                if logged or not result.finite:  # on every rank: the largest gradient of FSDP shards is a collective
                    signals = monitor.collect(logits, result.grad_norm, optimizer)  # before zero_grad: it reads the gradients
                if result.finite and ema is not None:
                    ema.update_parameters(model)
                stepper.update()
                optimizer.zero_grad(set_to_none=True)
                run.count(result.finite, result.overflow)
                if run.diverged:
                    failing = dict(loss=loss.item(), lr=lr, images_per_s=0.0, skipped=run.skipped, **signals)
                    run.log("steps", failing, step=step + 1)  # the failing step goes into the curves too
                    raise run.divergence(
                        "loss or gradient",
                        f"loss {loss.item():.4g}; {monitor.summary()}",
                        "Lower optim.lr, set optim.clip_grad_norm, or try the stabilisers "
                        "(model.options.qk_norm, model.options.branch_norm=mlp)",
                    )
                run.advance(tc.batch_size)

                if run.due(tc.log_every_steps):
                    mean_loss = distributed.all_reduce(loss.detach().float().clone()).item() / ctx.world_size
                    rate = run.images_per_s
                    values = dict(
                        loss=mean_loss,
                        lr=lr,
                        images_per_s=rate,
                        skipped=run.skipped,
                        **{k: v.item() for k, v in extra.items()},
                        **signals,
                    )
                    run.log("steps", values, postfix=dict(loss=f"{mean_loss:.3f}", img_s=f"{rate:.0f}"))
                if run.due(eval_every):
                    metrics = log_evaluation(run.data_wait())  # the wait: of the training time since the last evaluation
                    if tc.divergence_patience and above_start.exceeded(metrics["test_loss"]):
                        raise TrainingDiverged(
                            f"training diverged: the test loss stayed above its step-0 value {above_start.l0:.4g} for "
                            f"{tc.divergence_patience} evaluations in a row, the last {metrics['test_loss']:.4g} at step "
                            f"{run.step} (train.divergence_patience={tc.divergence_patience}). Lower optim.lr or try the "
                            "stabilisers (model.options.qk_norm, optim.clip_grad_norm)"
                        )
                run.end_step(save)
                if run.step >= total_steps:
                    break
            if sources.train.bad_files:
                shown = ", ".join(f"{name} ({why})" for name, why in sources.train.bad_files[:5])
                run.write(f"epoch {epoch}: skipped {len(sources.train.bad_files)} unreadable image(s): {shown}")

        run.check_stepped()
        elapsed = run.elapsed()
        logits, labels = dataset_logits(
            ema.module if ema else model, sources.test, tc.batch_size, ctx, precision, data.mean, data.std
        )
        final = classification_metrics(logits, labels)
        results = {
            "test": final,
            "steps": run.step,
            "epochs": run.epoch,
            "skipped_steps": run.skipped,
            "train_seconds_this_session": elapsed,
            "train_images_per_s": run.seen / elapsed if run.seen else None,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "world_size": ctx.world_size,
            "max_rank_param_difference": distributed.max_rank_difference(model),
            "precision": precision,
        }
        save({"test": final})
        if ctx.is_main:
            save_confusion_matrix(run.dir / "confusion_matrix.png", logits, labels, sources.classes)
        return run.finish(results, plot_curves)
