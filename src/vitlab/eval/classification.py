"""Evaluating classifiers: logits of a whole dataset on every rank, and its metrics (top-1, top-5, macro AUROC, loss)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc

from vitlab.data import DATASETS
from vitlab.data.augment import normalize
from vitlab.data.sources import MemoryEval, StreamEval, run_data
from vitlab.errors import AT_LEAST_1, VitlabError, check_range
from vitlab.runs.stored import load_checkpoint_model
from vitlab.runtime import distributed
from vitlab.runtime.context import Runtime, local
from vitlab.runtime.precision import autocast


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc@1, acc@5 (only with more than 5 classes: with 5 or fewer it is 100 % by construction), macro
    one-vs-rest AUROC, mean loss."""
    logits, labels = logits.float().cpu(), labels.cpu()
    num_classes = logits.shape[1]
    kwargs = dict(num_classes=num_classes, average="micro")
    top_k = (1, 5) if num_classes > 5 else (1,)
    return {
        **{f"acc{k}": multiclass_accuracy(logits, labels, top_k=k, **kwargs).item() for k in top_k},
        "auroc": multiclass_auroc(logits.softmax(-1), labels, num_classes=num_classes, average="macro").item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }


def metrics_line(metrics: dict[str, float]) -> str:
    """Classification metrics in one readable line: acc@1, acc@5 where there is one, AUROC, loss."""
    accuracies = ", ".join(f"acc@{key[3:]} {100 * metrics[key]:.2f} %" for key in ("acc1", "acc5") if key in metrics)
    return f"{accuracies}, AUROC {metrics['auroc']:.4f}, loss {metrics['loss']:.4f}"


@torch.no_grad()
def dataset_logits(
    model: torch.nn.Module,
    split: MemoryEval | StreamEval,
    batch_size: int,
    ctx: Runtime,
    precision: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole evaluation split (normalised by `mean`, `std`); each rank runs its shard, all get everything.

    Images a streaming worker could not decode are missing from the result (and named by the loader).
    """
    was_training = model.training
    model.eval()
    logits, labels, index = [], [], []
    for images, y, idx in split.batches(batch_size, ctx.rank, ctx.world_size):
        with autocast(ctx.device, precision):
            logits.append(model(normalize(images.to(ctx.device), mean, std)).float())
        labels.append(y.to(ctx.device))
        index.append(idx.to(ctx.device))
    model.train(was_training)
    logits, labels, index = (distributed.all_gather_cat(torch.cat(t)) for t in (logits, labels, index))
    # Scatter by example index: shards padded with repeats write the same values twice.
    all_logits = logits.new_zeros(split.size, logits.shape[1])
    all_labels = labels.new_full((split.size,), -1)
    all_logits[index], all_labels[index] = logits, labels
    seen = all_labels >= 0
    return all_logits[seen].cpu(), all_labels[seen].cpu()


def evaluate(model, split, batch_size, ctx, precision, mean=(0.5,), std=(0.5,)) -> dict[str, float]:
    """Metrics of `model` on an evaluation split (acc@1, acc@5, AUROC, loss)."""
    return classification_metrics(*dataset_logits(model, split, batch_size, ctx, precision, mean, std))


def evaluate_checkpoint(
    path: str | Path, data_name: str | None = None, data_root: str | None = None, batch_size: int = 256, ema: bool = False
) -> dict[str, float]:
    """Rebuild a checkpoint's model and evaluate it on its run's test split (or another dataset)."""
    if data_root and not data_name:
        raise VitlabError(
            f"--data-root {data_root} without --data would evaluate the run's own data; "
            f"pass --data too (one of {', '.join(DATASETS)})"
        )
    check_range("--batch-size", batch_size, AT_LEAST_1)
    model, config = load_checkpoint_model(path, ema)
    data = config.data
    if data_name:
        data.name, data.root = data_name, data_root
        data.validate()
    found = run_data(data, batch_size, seed=0, train=False)
    if found.num_classes != model.num_classes:
        raise VitlabError(f"the checkpoint predicts {model.num_classes} classes but {data.name} has {found.num_classes}")
    ctx = local(config.train.device, config.train.precision)
    return evaluate(model.to(ctx.device), found.test, batch_size, ctx, ctx.precision, data.mean, data.std)
